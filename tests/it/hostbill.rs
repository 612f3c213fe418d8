//! The HostBill backend against the fake HostBill.

use std::collections::{BTreeMap, BTreeSet};

use concertim_billing::{
    billing::{ledger::Snapshot, HostBill, Ledger},
    class::ErrorClass,
    event::{Event, InstanceAction, Timestamp},
    executor::{Delivery, Executor, Outcome},
    fixture::FixtureDelivery,
};
use proptest::prelude::*;
use rust_decimal::Decimal;

use crate::support::{
    assert_no_failures, billable, deliveries,
    hostbill::{FakeHostBill, HostBillState},
    permutation_with_duplicates, resize_settings as settings, run_through, through_ledger,
};

const PRODUCTS: [(&str, &str); 2] = [("openstack-standard-monthly", "1"), ("openstack-large-monthly", "2")];

async fn through_hostbill(fake: &FakeHostBill, fixtures: &[&FixtureDelivery]) -> Vec<Outcome> {
    run_through(HostBill::new(fake.settings(&PRODUCTS)).unwrap(), fixtures).await.1
}

/// The ledger in HostBill's terms: clients by project, the product and liveness of each
/// instance's account, usage per instance and variable.
fn as_hostbill(s: &Snapshot) -> HostBillState {
    let product = |plan: &str| PRODUCTS.iter().find(|(p, _)| *p == plan).unwrap().1.to_owned();
    HostBillState {
        clients: s.accounts.iter().map(|a| a.project_id.to_string()).collect(),
        accounts: s
            .subscriptions
            .iter()
            .map(|x| (x.instance_id.to_string(), (product(x.plan.as_str()), x.state == "active")))
            .collect(),
        usage: s
            .usage
            .iter()
            .map(|u| ((u.instance_id.to_string(), u.unit.to_string()), u.amount))
            .collect::<BTreeMap<_, Decimal>>(),
    }
}

#[tokio::test]
async fn the_fixture_lifecycles_leave_hostbill_billing_what_the_ledger_bills() {
    let fake = FakeHostBill::start().await;
    let all = billable();
    let fixtures: Vec<&FixtureDelivery> = all.iter().collect();
    assert_no_failures(&through_hostbill(&fake, &fixtures).await);
    assert_eq!(fake.state(), as_hostbill(&through_ledger(&fixtures).await));
}

/// What HostBill cannot reproduce of the ledger in this order: an account cannot change product
/// once terminated, and HostBill records no termination time, so usage is judged by when it
/// arrives, not by its date: usage arriving after the delete is not sent, and usage dated after
/// the delete but arriving before it is billed (the ledger, knowing the end, does the opposite).
fn masked(order: &[&FixtureDelivery], state: &mut HostBillState) {
    let executor = Executor::new(settings(), Ledger::in_memory());
    let mut closed = BTreeSet::new();
    let mut gone = BTreeSet::new();
    let (mut plan, mut usage) = (BTreeSet::new(), BTreeSet::new());
    let (mut ends, mut project_ends, mut dated) = (BTreeMap::new(), BTreeMap::new(), Vec::new());
    for d in order {
        let Ok(n) = executor.decode(&d.body) else { continue };
        match &n.event {
            Event::ProjectDeleted { project } => {
                closed.insert(project.to_string());
            }
            Event::Instance { action, instance } => {
                let id = instance.id.to_string();
                let dead = gone.contains(&id) || closed.contains(instance.project.as_str());
                match action {
                    InstanceAction::Deleted => {
                        gone.insert(id);
                    }
                    InstanceAction::Resized if dead => {
                        plan.insert(id);
                    }
                    _ => {}
                }
            }
            Event::Usage { samples, .. } => {
                for s in samples {
                    if gone.contains(s.resource.as_str()) || closed.contains(s.project.as_str()) {
                        usage.insert(s.resource.to_string());
                    }
                    dated.push((s.resource.to_string(), s.project.to_string(), s.timestamp));
                }
            }
            _ => {}
        }
        match &n.event {
            Event::Instance { action: InstanceAction::Deleted, instance } => {
                let end = instance.deleted_at.unwrap_or(n.meta.timestamp);
                ends.entry(instance.id.to_string()).and_modify(|e: &mut Timestamp| *e = (*e).min(end)).or_insert(end);
            }
            Event::ProjectDeleted { project } => {
                project_ends.insert(project.to_string(), n.meta.timestamp);
            }
            _ => {}
        }
    }
    for (instance, project, at) in dated {
        let after_end =
            ends.get(&instance).is_some_and(|end| at > *end) || project_ends.get(&project).is_some_and(|end| at > *end);
        if after_end {
            usage.insert(instance);
        }
    }
    for (id, (product, _)) in state.accounts.iter_mut() {
        if plan.contains(id) {
            *product = "(masked)".into();
        }
    }
    state.usage.retain(|(id, _), _| !usage.contains(id));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_order_with_duplicates_and_redeliveries_leaves_hostbill_billing_what_the_ledger_bills(
        order in permutation_with_duplicates(billable().len()),
        redelivered in any::<bool>(),
    ) {
        let all = billable();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let fake = FakeHostBill::start().await;
            let fixtures: Vec<FixtureDelivery> =
                order.iter().map(|i| FixtureDelivery { redelivered: redelivered || all[*i].redelivered, ..all[*i].clone() }).collect();
            let fixtures: Vec<&FixtureDelivery> = fixtures.iter().collect();
            assert_no_failures(&through_hostbill(&fake, &fixtures).await);
            let in_order: Vec<&FixtureDelivery> = all.iter().collect();
            let (mut got, mut want) = (fake.state(), as_hostbill(&through_ledger(&in_order).await));
            masked(&fixtures, &mut got);
            masked(&fixtures, &mut want);
            assert_eq!(got, want);
        });
    }
}

fn usage_message() -> FixtureDelivery {
    deliveries("nova-legacy").into_iter().find(|d| d.exchange.as_deref() == Some("ceilometer")).unwrap()
}

#[tokio::test]
async fn a_usage_message_redelivered_after_hostbills_reply_adds_nothing_the_second_time() {
    let fake = FakeHostBill::start().await;
    let usage = usage_message();
    // The first delivery is recorded, then the process dies before its ack: the broker
    // delivers it again, flagged redelivered.
    let again = FixtureDelivery { redelivered: true, ..usage.clone() };
    let outcomes = through_hostbill(&fake, &[&usage, &again, &usage]).await;
    assert_no_failures(&outcomes);
    assert_eq!(fake.usage_rows(), 3, "one entry per variable, once");
    let Outcome::Processed { effects, .. } = &outcomes[1] else { panic!("{:?}", outcomes[1]) };
    assert_eq!(effects.done, 0, "{effects:?}");
}

#[tokio::test]
async fn success_false_is_permanent_with_hostbills_own_words_and_5xx_is_transient() {
    let fake = FakeHostBill::start().await;
    let usage = usage_message();
    fake.refuse_next("API function not allowed for this key");
    let outcome = &through_hostbill(&fake, &[&usage]).await[0];
    assert_eq!(outcome.class(), Some(ErrorClass::Permanent));
    let Outcome::Failed { error, .. } = outcome else { panic!() };
    assert!(error.to_string().contains("API function not allowed for this key"), "{error}");

    fake.fail_next(&[503]);
    assert_eq!(through_hostbill(&fake, &[&usage]).await[0].class(), Some(ErrorClass::Transient));
    // An empty 200 (a proxy's or maintenance answer) is not HostBill's reply: tried again.
    fake.fail_next(&[200]);
    assert_eq!(through_hostbill(&fake, &[&usage]).await[0].class(), Some(ErrorClass::Transient));

    let mut closed = fake.settings(&PRODUCTS);
    closed.url = Some("http://127.0.0.1:1".into());
    let executor = Executor::new(settings(), HostBill::new(closed).unwrap());
    let outcome = executor.handle(Delivery { body: &usage.body, redelivered: false }).await;
    assert_eq!(outcome.class(), Some(ErrorClass::Transient), "connection refused");
}

#[test]
fn config_check_names_the_missing_hostbill_settings() {
    let out = crate::support::binary()
        .args(["config", "check"])
        .env("CONCERTIM_BILLING_BILLING__BACKEND", "hostbill")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in
        ["hostbill.url", "hostbill.api_id", "hostbill.api_key", "hostbill.products.\"openstack-standard-monthly\""]
    {
        assert!(stderr.contains(key), "{key} missing from: {stderr}");
    }
}
