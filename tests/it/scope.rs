//! The managed scope (`projects.managed_by`): only projects on which the configured user holds
//! the configured role are billed, from their resources' start whenever the admission arrives,
//! and until the role is removed; in any order, with any duplicates.

use concertim_billing::{
    billing::{ledger::Snapshot, Ledger},
    config::{ManagedBy, Settings, DEFAULT_TOML},
    event::{RoleId, Timestamp, UserId},
    executor::{Delivery, Executor, Outcome},
    settle::Horizon,
};
use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::support::{deliveries, permutation_with_duplicates};

/// The managed project, and one the managing user has no role on.
const MANAGED: &str = "c0ffee00000000000000000000000001";
const OTHER: &str = "c0ffee00000000000000000000000002";
const USER: &str = "u-concertim";
const ROLE: &str = "r-watcher";
const VM: &str = "5c0be000-0000-4000-8000-000000000001";
const OTHER_VM: &str = "5c0be000-0000-4000-8000-000000000002";

fn settings() -> Settings {
    let mut settings = Settings::from_toml(DEFAULT_TOML, "test").unwrap();
    settings.projects.managed_by = Some(ManagedBy::ids(UserId::parse(USER).unwrap(), RoleId::parse(ROLE).unwrap()));
    settings
}

fn envelope(message: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": message.to_string()})).unwrap()
}

fn at(hms: &str) -> String {
    format!("2026-11-02T{hms}.000000")
}

/// A Keystone role assignment, as Keystone's CADF notification carries it.
fn role(operation: &str, project: &str, user: &str, sent: &str) -> Vec<u8> {
    envelope(&json!({
        "message_id": format!("role-{operation}-{project}-{user}"),
        "event_type": format!("identity.role_assignment.{operation}"),
        "publisher_id": "identity.host1",
        "priority": "INFO",
        "timestamp": at(sent),
        "payload": {
            "typeURI": "http://schemas.dmtf.org/cloud/audit/1.0/event",
            "eventType": "activity",
            "action": format!("{operation}.role_assignment"),
            "outcome": "success",
            "role": ROLE,
            "project": project,
            "user": user,
            "inherited_to_projects": false,
        },
    }))
}

/// A legacy Nova notification of `vm` in `project`: created, or deleted with its times.
fn nova(event: &str, project: &str, vm: &str, sent: &str, times: [&str; 3]) -> Vec<u8> {
    let template = deliveries("nova-legacy")
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains(r#"\"event_type\": \"compute.instance.create.end\""#))
        .expect("fixtures/nova-legacy has a create.end");
    let outer: Value = serde_json::from_slice(&template.body).unwrap();
    let mut message: Value = serde_json::from_str(outer["oslo.message"].as_str().unwrap()).unwrap();
    let time = |t: &str| if t.is_empty() { String::new() } else { at(t) };
    message["message_id"] = json!(format!("{vm}-{event}"));
    message["event_type"] = json!(format!("compute.instance.{event}"));
    message["timestamp"] = json!(at(sent));
    message["payload"]["instance_id"] = json!(vm);
    message["payload"]["tenant_id"] = json!(project);
    message["payload"]["state"] = json!(if event == "delete.end" { "deleted" } else { "active" });
    message["payload"]["launched_at"] = json!(time(times[0]));
    message["payload"]["terminated_at"] = json!(time(times[1]));
    message["payload"]["deleted_at"] = json!(time(times[2]));
    envelope(&message)
}

/// The day's messages: both projects, the managing user's role on one of them (removed at
/// 11:00) and another user's on the other, an instance in each from 09:10 to 12:10.
fn day() -> Vec<Vec<u8>> {
    vec![
        role("created", MANAGED, USER, "09:00:30"),
        role("created", OTHER, "u-someone-else", "09:00:30"),
        nova("create.end", MANAGED, VM, "09:10:01", ["09:10:00", "", ""]),
        nova("create.end", OTHER, OTHER_VM, "09:10:01", ["09:10:00", "", ""]),
        role("deleted", MANAGED, USER, "11:00:00"),
        nova("delete.end", MANAGED, VM, "12:10:02", ["09:10:00", "12:10:00", "12:10:01"]),
        nova("delete.end", OTHER, OTHER_VM, "12:10:02", ["09:10:00", "12:10:00", "12:10:01"]),
    ]
}

/// What the ledger holds after the messages in `order`, settled as of 13:00.
fn billed(order: impl IntoIterator<Item = usize>, all: &[Vec<u8>]) -> Snapshot {
    let executor = Executor::new(settings(), Ledger::in_memory());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        for i in order {
            let outcome = executor.handle(Delivery { body: &all[i], redelivered: false }).await;
            assert!(matches!(outcome, Outcome::Processed { .. } | Outcome::Ignored { .. }), "{outcome:?}");
        }
        let as_of = Timestamp::parse("2026-11-02T13:00:00Z").unwrap().unix();
        let pass = executor.settler().await.unwrap().pass(Horizon::AsOf(as_of)).await.unwrap();
        assert!(pass.failures.is_empty(), "{:?}", pass.failures);
    });
    executor.billing().snapshot()
}

/// Only the managed project has an account, and its instance is billed from its launch (09:10)
/// to the role's removal (11:00): 6,600 seconds.
fn assert_managed_only(snapshot: &Snapshot) {
    let accounts: Vec<&str> = snapshot.accounts.iter().map(|a| a.project_id.as_str()).collect();
    assert_eq!(accounts, [MANAGED], "{snapshot:?}");
    let subscriptions: Vec<&str> = snapshot.subscriptions.iter().map(|s| s.instance_id.as_str()).collect();
    assert_eq!(subscriptions, [VM], "{snapshot:?}");
    let seconds: Decimal = snapshot
        .usage
        .iter()
        .filter(|u| u.instance_id.as_str() == VM && u.unit.as_str() == "openstack-instance-seconds")
        .map(|u| u.amount)
        .sum();
    assert_eq!(seconds, Decimal::from(6_600), "{snapshot:?}");
}

#[test]
fn only_the_managed_project_is_billed_from_launch_until_its_role_is_removed() {
    let all = day();
    assert_managed_only(&billed(0..all.len(), &all));
}

#[test]
fn an_admission_that_arrives_after_the_instance_still_bills_it_from_its_launch() {
    let all = day();
    // The creates and the delete first, the admission last, its removal never.
    let snapshot = billed([2, 3, 5, 6, 1, 0], &all);
    let seconds: Decimal =
        snapshot.usage.iter().filter(|u| u.unit.as_str() == "openstack-instance-seconds").map(|u| u.amount).sum();
    assert_eq!(seconds, Decimal::from(3 * 3_600), "09:10 to 12:10: {snapshot:?}");
    assert_eq!(snapshot.accounts.len(), 1, "{snapshot:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_order_with_any_duplicates_bills_only_the_managed_project_to_the_second(
        order in permutation_with_duplicates(day().len())
    ) {
        assert_managed_only(&billed(order, &day()));
    }
}

/// `body` as sent by a caller acting in `project`, named `name`.
fn from_caller(body: &[u8], project: &str, name: &str) -> Vec<u8> {
    let outer: Value = serde_json::from_slice(body).unwrap();
    let mut message: Value = serde_json::from_str(outer["oslo.message"].as_str().unwrap()).unwrap();
    message["_context_project_id"] = json!(project);
    message["_context_project_name"] = json!(name);
    envelope(&message)
}

#[test]
fn a_project_whose_name_matches_include_names_is_billed_from_launch_whichever_message_names_it() {
    let mut settings = Settings::from_toml(DEFAULT_TOML, "test").unwrap();
    settings.projects.include_names = vec!["CM_*".into()];
    // Only the managed project's delete names it; the other is named, but not as Concertim names.
    let all = [
        nova("create.end", MANAGED, VM, "09:10:01", ["09:10:00", "", ""]),
        nova("create.end", OTHER, OTHER_VM, "09:10:01", ["09:10:00", "", ""]),
        from_caller(
            &nova("delete.end", MANAGED, VM, "12:10:02", ["09:10:00", "12:10:00", "12:10:01"]),
            MANAGED,
            "CM_physics",
        ),
        from_caller(
            &nova("delete.end", OTHER, OTHER_VM, "12:10:02", ["09:10:00", "12:10:00", "12:10:01"]),
            OTHER,
            "admin",
        ),
    ];
    for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]] {
        let executor = Executor::new(settings.clone(), Ledger::in_memory());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            for i in order {
                executor.handle(Delivery { body: &all[i], redelivered: false }).await;
            }
            let as_of = Timestamp::parse("2026-11-02T13:00:00Z").unwrap().unix();
            executor.settler().await.unwrap().pass(Horizon::AsOf(as_of)).await.unwrap();
        });
        let snapshot = executor.billing().snapshot();
        let accounts: Vec<&str> = snapshot.accounts.iter().map(|a| a.project_id.as_str()).collect();
        assert_eq!(accounts, [MANAGED], "{order:?}");
        let seconds: Decimal =
            snapshot.usage.iter().filter(|u| u.unit.as_str() == "openstack-instance-seconds").map(|u| u.amount).sum();
        assert_eq!(seconds, Decimal::from(3 * 3_600), "{order:?}");
    }
}

#[tokio::test]
async fn at_start_the_projects_keystone_says_are_managed_are_admitted_without_their_notifications() {
    let keystone = crate::support::keystone::FakeKeystone::start().await;
    let user = keystone.add_user("concertim");
    let role = keystone.add_role("watcher");
    let managed = keystone.add_project("CM_physics");
    let named = keystone.add_project("CM_chemistry");
    let other = keystone.add_project("admin");
    keystone.add_project("service");
    keystone.assign(&user, &role, &managed);
    keystone.assign(&user, &keystone.add_role("member"), &other);
    keystone.set_page_size(2);
    let mut settings = Settings::from_toml(DEFAULT_TOML, "test").unwrap();
    settings.projects.managed_by =
        // By name, as an operator writes it: resolved through Keystone.
        Some(ManagedBy {
            user_name: Some("concertim".into()),
            role_name: Some("watcher".into()),
            ..ManagedBy::default()
        });
    settings.projects.include_names = vec!["CM_chem*".into()];
    let app = concertim_billing::app::App::new(settings, Ledger::in_memory());
    let client = concertim_billing::keystone::Keystone::new(keystone.settings()).unwrap();
    assert_eq!(app.admit_from_keystone(&client).await.unwrap(), 2);
    assert_eq!(app.admit_from_keystone(&client).await.unwrap(), 0, "admitted once");
    // Only instance notifications from now on: the admitted projects are billed, the other not.
    for (project, vm) in [(&managed, VM), (&named, OTHER_VM), (&other, "5c0be000-0000-4000-8000-000000000003")] {
        for body in [
            nova("create.end", project, vm, "09:10:01", ["09:10:00", "", ""]),
            nova("delete.end", project, vm, "10:10:02", ["09:10:00", "10:10:00", "10:10:01"]),
        ] {
            app.executor.handle(Delivery { body: &body, redelivered: false }).await;
        }
    }
    let as_of = Timestamp::parse("2026-11-02T13:00:00Z").unwrap().unix();
    app.executor.settler().await.unwrap().pass(Horizon::AsOf(as_of)).await.unwrap();
    let snapshot = app.executor.billing().snapshot();
    let mut accounts: Vec<&str> = snapshot.accounts.iter().map(|a| a.project_id.as_str()).collect();
    accounts.sort_unstable();
    let mut expected = [managed.as_str(), named.as_str()];
    expected.sort_unstable();
    assert_eq!(accounts, expected, "{snapshot:?}");
}
