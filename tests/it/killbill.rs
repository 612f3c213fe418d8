//! The KillBill backend against the contract-faithful fake.

use std::time::Duration;

use concertim_billing::{
    billing::{ledger::Snapshot, Backend, KillBill, Ledger},
    class::ErrorClass,
    config::Settings,
    executor::{Delivery, Executor, Outcome},
    replay::fixture::FixtureDelivery,
};
use proptest::prelude::*;

use crate::support::{
    bus::{eventually, spawn_app, TestBus},
    deliveries,
    killbill::FakeKillBill,
};

/// The settings of the property tests: the resized flavor has a plan of its own.
fn settings() -> Settings {
    let text = concertim_billing::config::DEFAULT_TOML
        .replace("[billing.plans]\n", "[billing.plans]\n\"m1.large\" = \"openstack-large-monthly\"\n");
    Settings::from_toml(&text, "test").unwrap()
}

fn billable() -> Vec<FixtureDelivery> {
    ["nova-legacy", "nova-versioned", "keystone", "out-of-order", "duplicates"]
        .into_iter()
        .flat_map(deliveries)
        .collect()
}

fn billing_part(s: &Snapshot) -> (Vec<String>, Vec<String>, Vec<String>) {
    billing_part_masked(s, &[])
}

/// The comparable content; the plans of `masked` instances are left out.
fn billing_part_masked(s: &Snapshot, masked: &[String]) -> (Vec<String>, Vec<String>, Vec<String>) {
    (
        s.accounts.iter().map(|a| format!("{} {}", a.project_id, a.state)).collect(),
        s.subscriptions
            .iter()
            .map(|x| {
                let plan = if masked.contains(&x.instance_id.to_string()) {
                    "(masked)".to_owned()
                } else {
                    x.plan.to_string()
                };
                format!("{} {} {} {} {} {:?}", x.instance_id, x.project_id, plan, x.state, x.start, x.end)
            })
            .collect(),
        s.usage.iter().map(|u| format!("{} {} {}", u.instance_id, u.unit, u.amount)).collect(),
    )
}

async fn through_killbill(fake: &FakeKillBill, fixtures: &[&FixtureDelivery]) -> Vec<Outcome> {
    let executor = Executor::new(settings(), KillBill::new(fake.settings()).unwrap());
    let mut outcomes = Vec::new();
    for d in fixtures {
        outcomes.push(executor.handle(Delivery { body: &d.body, redelivered: d.redelivered }).await);
    }
    outcomes
}

async fn through_ledger(fixtures: &[&FixtureDelivery]) -> Snapshot {
    let executor = Executor::new(settings(), Ledger::in_memory());
    for d in fixtures {
        executor.handle(Delivery { body: &d.body, redelivered: d.redelivered }).await;
    }
    executor.billing().snapshot()
}

fn assert_no_failures(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(!matches!(o, Outcome::Failed { .. }), "{o:?}");
    }
}

#[tokio::test]
async fn the_fixture_lifecycles_leave_killbill_billing_what_the_ledger_bills() {
    let fake = FakeKillBill::start().await;
    let all = billable();
    let fixtures: Vec<&FixtureDelivery> = all.iter().collect();
    let outcomes = through_killbill(&fake, &fixtures).await;
    assert_no_failures(&outcomes);
    assert_eq!(billing_part(&fake.snapshot()), billing_part(&through_ledger(&fixtures).await));
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

/// Messages of one lifecycle by event type, from the legacy Nova fixtures.
fn legacy(event_type: &str) -> FixtureDelivery {
    deliveries("nova-legacy")
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains(&format!("\\\"event_type\\\": \\\"{event_type}\\\"")))
        .unwrap_or_else(|| panic!("no {event_type} fixture"))
}

fn legacy_usage() -> Vec<FixtureDelivery> {
    deliveries("nova-legacy").into_iter().filter(|d| d.exchange.as_deref() == Some("ceilometer")).collect()
}

#[tokio::test]
async fn a_duplicate_delivery_records_usage_once() {
    let fake = FakeKillBill::start().await;
    let usage = &legacy_usage()[0];
    let outcomes = through_killbill(&fake, &[usage, usage, usage]).await;
    assert_no_failures(&outcomes);
    let rows = fake.usage_rows();
    assert_eq!(rows, 3, "one call, three units, stored once");
    let Outcome::Processed { effects, .. } = &outcomes[1] else { panic!("{:?}", outcomes[1]) };
    assert_eq!(effects.done, 0, "the second delivery found everything done: {effects:?}");
}

#[tokio::test]
async fn delete_before_create_bills_the_real_lifetime_and_the_late_create_changes_nothing() {
    let fake = FakeKillBill::start().await;
    let (delete, create) = (legacy("compute.instance.delete.end"), legacy("compute.instance.create.end"));
    let outcomes = through_killbill(&fake, &[&delete, &create]).await;
    assert_no_failures(&outcomes);
    let snapshot = fake.snapshot();
    let sub = &snapshot.subscriptions[0];
    assert_eq!(
        (sub.start.to_rfc3339(), sub.end.map(|e| e.to_rfc3339())),
        ("2025-03-03T09:00:41Z".into(), Some("2025-03-03T09:40:03Z".into()))
    );
    let Outcome::Processed { effects, .. } = &outcomes[1] else { panic!() };
    assert_eq!(effects.done, 0);
}

#[tokio::test]
async fn usage_before_create_ensures_the_subscription_from_the_sample() {
    let fake = FakeKillBill::start().await;
    let usage = &legacy_usage()[0];
    let outcomes = through_killbill(&fake, &[usage]).await;
    assert_no_failures(&outcomes);
    let snapshot = fake.snapshot();
    assert_eq!(snapshot.accounts.len(), 1);
    assert_eq!(snapshot.subscriptions[0].start.to_rfc3339(), "2025-03-03T09:00:41Z");
    assert_eq!(snapshot.usage.len(), 3);
    let id = fake.subscription_id(snapshot.subscriptions[0].instance_id.as_str()).unwrap();
    let fields = fake.fields_of(&id);
    assert!(fields.contains(&("openstack_flavor".into(), "m1.small".into())), "{fields:?}");
}

#[tokio::test]
async fn usage_after_delete_is_counted_late_and_acknowledged() {
    let fake = FakeKillBill::start().await;
    let create = legacy("compute.instance.create.end");
    let delete = legacy("compute.instance.delete.end");
    let late = legacy_usage().pop().unwrap();
    let outcomes = through_killbill(&fake, &[&create, &delete, &late]).await;
    let Outcome::Processed { effects, .. } = &outcomes[2] else { panic!("{:?}", outcomes[2]) };
    assert_eq!(effects.late, 1);
    assert_eq!(fake.usage_rows(), 0);
}

#[tokio::test]
async fn resize_moves_the_subscription_to_the_new_flavors_plan() {
    let fake = FakeKillBill::start().await;
    let create = legacy("compute.instance.create.end");
    let resize = legacy("compute.instance.finish_resize.end");
    let outcomes = through_killbill(&fake, &[&create, &resize, &resize]).await;
    assert_no_failures(&outcomes);
    assert_eq!(fake.snapshot().subscriptions[0].plan.as_str(), "openstack-large-monthly");
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn a_wrong_password_is_permanent_with_the_answer_in_the_error() {
    let fake = FakeKillBill::start().await;
    let mut kb = fake.settings();
    kb.password = concertim_billing::config::Secret::new("wrong");
    let executor = Executor::new(settings(), KillBill::new(kb).unwrap());
    let create = legacy("compute.instance.create.end");
    let outcome = executor.handle(Delivery { body: &create.body, redelivered: false }).await;
    assert_eq!(outcome.class(), Some(ErrorClass::Permanent));
    let Outcome::Failed { error, .. } = outcome else { panic!() };
    assert!(error.to_string().contains("HTTP 401"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killbill_answering_503_for_a_while_is_retried_and_records_once() {
    let fake = FakeKillBill::start().await;
    let bus = TestBus::new("kb503").await;
    let usage = legacy_usage()[0].clone();
    let app = spawn_app(&bus, Backend::KillBill(KillBill::new(fake.settings()).unwrap()), None).await;
    // More 503s than the in-process retries absorb: the retry queue brings it back.
    fake.fail_next(&[503; 12]);
    bus.publish(&usage).await;
    eventually("the usage in KillBill", Duration::from_secs(60), || async { (fake.usage_rows() == 3).then_some(()) })
        .await;
    let names = bus.names();
    eventually("the queues to empty", Duration::from_secs(60), || async {
        (bus.depth(&names.queue).await == 0 && bus.depth(&names.retry_queue).await == 0).then_some(())
    })
    .await;
    assert_eq!(fake.usage_rows(), 3, "recorded once");
    assert_eq!(bus.depth(&names.dead_queue).await, 0);
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

fn permutation_with_duplicates(n: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(any::<bool>(), n).prop_flat_map(move |dup| {
        let mut order: Vec<usize> = (0..n).collect();
        order.extend((0..n).filter(|i| dup[*i]));
        Just(order).prop_shuffle()
    })
}

/// Instances whose resize comes after their delete in this order. KillBill cannot change the
/// plan of a cancelled subscription, so there the plan stays the one before the resize, where
/// the ledger (order-independent) shows the resized one; everything else must agree.
fn resized_after_delete(order: &[&FixtureDelivery]) -> Vec<String> {
    use concertim_billing::event::{Event, InstanceAction};
    let executor = Executor::new(settings(), Ledger::in_memory());
    let mut deleted = std::collections::BTreeSet::new();
    let mut masked = Vec::new();
    for d in order {
        if let Ok(n) = executor.decode(&d.body) {
            if let Event::Instance { action, instance } = &n.event {
                match action {
                    InstanceAction::Deleted => {
                        deleted.insert(instance.id.to_string());
                    }
                    InstanceAction::Resized if deleted.contains(instance.id.as_str()) => {
                        masked.push(instance.id.to_string())
                    }
                    _ => {}
                }
            }
        }
    }
    masked
}

/// The lifecycle messages without project deletions: KillBill cannot move a cancellation
/// earlier, so a project deletion that overtakes its instances' deletions ends their
/// subscriptions at the project's deletion (the ledger takes the earlier instance deletion).
fn reorderable() -> Vec<FixtureDelivery> {
    billable().into_iter().filter(|d| !String::from_utf8_lossy(&d.body).contains("identity.project.deleted")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_order_with_duplicates_leaves_killbill_billing_what_the_ledger_bills(order in permutation_with_duplicates(reorderable().len())) {
        let all = reorderable();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let fake = FakeKillBill::start().await;
            let fixtures: Vec<&FixtureDelivery> = order.iter().map(|i| &all[*i]).collect();
            let outcomes = through_killbill(&fake, &fixtures).await;
            assert_no_failures(&outcomes);
            let in_order: Vec<&FixtureDelivery> = all.iter().collect();
            let masked = resized_after_delete(&fixtures);
            assert_eq!(
                billing_part_masked(&fake.snapshot(), &masked),
                billing_part_masked(&through_ledger(&in_order).await, &masked)
            );
            assert!(fake.violations().is_empty(), "{:?}", fake.violations());
        });
    }
}

#[tokio::test]
async fn bootstrap_creates_the_tenant_and_uploads_the_catalog_once() {
    use concertim_billing::billing::killbill::CATALOG_XML;
    let fake = FakeKillBill::start().await;
    let kb = KillBill::new(fake.settings()).unwrap();
    let first = kb.bootstrap(CATALOG_XML, "tests").await.unwrap();
    assert!(first.tenant_created && first.catalog_uploaded, "{first:?}");
    let second = kb.bootstrap(CATALOG_XML, "tests").await.unwrap();
    assert!(!second.tenant_created && !second.catalog_uploaded, "{second:?}");
    assert_eq!(fake.catalogs().len(), 1);
}

#[test]
fn the_catalog_declares_every_default_unit_and_plan() {
    use concertim_billing::billing::killbill::CATALOG_XML;
    let settings = Settings::embedded();
    for rule in settings.billing.meters.values() {
        assert!(CATALOG_XML.contains(&format!("<unit name=\"{}\"/>", rule.unit)), "unit {}", rule.unit);
    }
    for plan in std::iter::once(&settings.billing.default_plan).chain(settings.billing.plans.values()) {
        assert!(CATALOG_XML.contains(&format!("<plan name=\"{plan}\">")), "plan {plan}");
    }
    assert!(CATALOG_XML.contains("<plan name=\"openstack-large-monthly\">"));
}
