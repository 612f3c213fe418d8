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
    assert_no_failures, billable,
    bus::{eventually, spawn_app, TestBus},
    deliveries,
    killbill::FakeKillBill,
    permutation_with_duplicates, resize_settings as settings, run_through, through_ledger,
};

fn billing_part(s: &Snapshot) -> (Vec<String>, Vec<String>, Vec<String>) {
    comparable(s, &Masks { plan: Vec::new(), end: Vec::new() })
}

async fn through_killbill(fake: &FakeKillBill, fixtures: &[&FixtureDelivery]) -> Vec<Outcome> {
    let (_, outcomes) = run_through(KillBill::new(fake.settings()).unwrap(), fixtures).await;
    assert!(fake.violations().is_empty(), "bodies the OpenAPI spec rejects: {:?}", fake.violations());
    outcomes
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
    let mut bus = TestBus::new("kb503").await;
    // No in-process retries: each attempt meets exactly one 503 and goes back through the
    // retry queue, so two 503s mean success on the third and last attempt, whatever the timing.
    bus.settings.bus.backoff.max_elapsed_ms = 0;
    let usage = legacy_usage()[0].clone();
    let app = spawn_app(&bus, Backend::KillBill(KillBill::new(fake.settings()).unwrap()), None).await;
    fake.fail_next(&[503, 503]);
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

/// What KillBill cannot reproduce of the ledger in this order. KillBill cannot change the plan
/// of a cancelled subscription, nor move a cancellation earlier; the ledger, independent of
/// order, can. So: the plan of an instance resized after it was cancelled (by its own delete or
/// its project's), and the end (and the usage counted up to it) of an instance deleted after
/// its project was.
struct Masks {
    plan: Vec<String>,
    end: Vec<String>,
}

fn masks(order: &[&FixtureDelivery]) -> Masks {
    use concertim_billing::event::{Event, InstanceAction};
    let executor = Executor::new(settings(), Ledger::in_memory());
    let mut closed = std::collections::BTreeSet::new();
    let mut cancelled = std::collections::BTreeSet::new();
    let mut masks = Masks { plan: Vec::new(), end: Vec::new() };
    for d in order {
        let Ok(n) = executor.decode(&d.body) else { continue };
        match &n.event {
            Event::ProjectDeleted { project } => {
                closed.insert(project.to_string());
            }
            Event::Instance { action, instance } => {
                let id = instance.id.to_string();
                let project_closed = closed.contains(instance.project.as_str());
                match action {
                    InstanceAction::Deleted => {
                        if project_closed {
                            masks.end.push(id.clone());
                        }
                        cancelled.insert(id);
                    }
                    InstanceAction::Resized if project_closed || cancelled.contains(&id) => masks.plan.push(id),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    masks
}

fn comparable(s: &Snapshot, masks: &Masks) -> (Vec<String>, Vec<String>, Vec<String>) {
    let hide = |list: &[String], id: &str, value: String| {
        if list.iter().any(|m| m == id) {
            "(masked)".to_owned()
        } else {
            value
        }
    };
    (
        s.accounts.iter().map(|a| format!("{} {}", a.project_id, a.state)).collect(),
        s.subscriptions
            .iter()
            .map(|x| {
                let id = x.instance_id.to_string();
                let plan = hide(&masks.plan, &id, x.plan.to_string());
                let end = hide(&masks.end, &id, format!("{:?}", x.end.map(|e| e.to_rfc3339())));
                format!("{id} {} {plan} {} {} {end}", x.project_id, x.state, x.start)
            })
            .collect(),
        s.usage
            .iter()
            .filter(|u| !masks.end.iter().any(|m| m == u.instance_id.as_str()))
            .map(|u| format!("{} {} {}", u.instance_id, u.unit, u.amount))
            .collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_order_with_duplicates_leaves_killbill_billing_what_the_ledger_bills(order in permutation_with_duplicates(billable().len())) {
        let all = billable();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let fake = FakeKillBill::start().await;
            let fixtures: Vec<&FixtureDelivery> = order.iter().map(|i| &all[*i]).collect();
            let outcomes = through_killbill(&fake, &fixtures).await;
            assert_no_failures(&outcomes);
            let in_order: Vec<&FixtureDelivery> = all.iter().collect();
            let masks = masks(&fixtures);
            assert_eq!(comparable(&fake.snapshot(), &masks), comparable(&through_ledger(&in_order).await, &masks));
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

#[tokio::test]
async fn a_project_deleted_before_created_leaves_a_closed_account_and_the_late_create_changes_nothing() {
    let fake = FakeKillBill::start().await;
    let fixtures = deliveries("out-of-order/project-deleted-before-created.jsonl");
    let (deleted, created) = (&fixtures[0], &fixtures[1]);
    let outcomes = through_killbill(&fake, &[deleted, created]).await;
    assert_no_failures(&outcomes);
    assert_eq!(fake.snapshot().accounts[0].state, "closed");
    let Outcome::Processed { effects, .. } = &outcomes[1] else { panic!() };
    assert_eq!(effects.done, 0);
}

#[tokio::test]
async fn the_fake_sums_usage_over_a_half_open_window_and_wants_both_dates() {
    let fake = FakeKillBill::start().await;
    let usage = &legacy_usage()[0];
    through_killbill(&fake, &[usage]).await;
    let id = fake.subscription_id(&fake.snapshot().subscriptions[0].instance_id.to_string()).unwrap();
    let http = reqwest::Client::new();
    let get = |query: &'static str| {
        http.get(format!("{}/1.0/kb/usages/{id}?{query}", fake.url))
            .basic_auth("admin", Some("password"))
            .header("X-Killbill-ApiKey", "bob")
            .header("X-Killbill-ApiSecret", "lazar")
            .send()
    };
    let missing = get("startDate=2025-03-03").await.unwrap();
    assert_eq!(missing.status(), 400);
    assert!(missing.text().await.unwrap().is_empty(), "an empty 400");
    // The sample is dated 09:10:00.101: a window ending exactly there excludes it.
    let before: serde_json::Value =
        get("startDate=2025-03-03&endDate=2025-03-03T09:10:00.101Z").await.unwrap().json().await.unwrap();
    assert_eq!(before["rolledUpUnits"], serde_json::json!([]));
    let after: serde_json::Value = get("startDate=2025-03-03&endDate=2025-03-04").await.unwrap().json().await.unwrap();
    assert_eq!(after["rolledUpUnits"].as_array().unwrap().len(), 3);
}
