//! Concertim as the second target: the fixture lifecycles shown in the fake Concertim, a
//! volume's lifecycle on its device, an outage that never holds billing up, an expired token,
//! and debounced team refreshes.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use concertim_billing::{
    billing::{HostBill, KillBill, Ledger},
    bus::Names,
    concertim::{worker::Done, Update, Worker},
    config::{Binding, MetricRule},
    event::{Event, ProjectId, Timestamp},
    fixture::FixtureDelivery,
    notification::{decode, DecodeLimits},
    price::Catalog,
};
use rust_decimal::Decimal;

use crate::support::{
    billable,
    bus::{spawn_app, usage_batch, usage_fixture, TestBus, TEST_UNIT},
    concertim::FakeConcertim,
    deliveries,
    hostbill::FakeHostBill,
    killbill::FakeKillBill,
    killbill_server::KillBillServer,
    wait::{eventually, eventually_with},
};

/// Everything the fixtures name: projects, instances (with usage or lifecycle events), stacks.
#[derive(Default)]
struct Named {
    projects: BTreeSet<String>,
    instances: BTreeSet<String>,
    stacks: BTreeSet<String>,
}

fn named(fixtures: &[FixtureDelivery]) -> Named {
    let mut named = Named::default();
    for d in fixtures {
        let Ok(n) = decode(&d.body, DecodeLimits::default()) else { continue };
        if let Some(p) = n.event.project() {
            named.projects.insert(p.to_string());
        }
        match &n.event {
            Event::Instance { instance, .. } => {
                named.instances.insert(instance.id.to_string());
            }
            Event::Usage { samples, .. } => named.instances.extend(samples.iter().map(|s| s.resource.to_string())),
            Event::Stack(stack) => {
                named.stacks.insert(stack.id.to_string());
            }
            _ => {}
        }
    }
    named
}

/// The test's namespace with Concertim pointing at `concertim` and a memory metric.
async fn concertim_bus(test: &str, concertim: &FakeConcertim) -> TestBus {
    let mut bus = TestBus::new(test).await;
    let mut settings = concertim.settings();
    settings.metrics.insert(
        "memory".into(),
        MetricRule {
            name: "ram_allocated".into(),
            units: "MB".into(),
            kind: "double".into(),
            slope: "both".into(),
            ttl: 3600,
        },
    );
    bus.settings.concertim = Some(settings);
    bus
}

/// Waits until `mismatches` lists nothing; on timeout, fails with what still differs.
async fn until_shown(what: &str, limit: Duration, mismatches: impl Fn() -> Vec<String>) {
    eventually_with(what, limit, || nothing_left(mismatches())).await
}

fn money(amount: Decimal) -> String {
    format!("{amount:.2}")
}

#[tokio::test]
async fn the_fixture_lifecycles_end_with_concertims_devices_racks_and_teams_as_they_should() {
    let kb = FakeKillBill::start().await;
    kb.set_price(TEST_UNIT, Decimal::new(1, 2));
    let concertim = FakeConcertim::start().await;
    let bus = concertim_bus("concertim-fixtures", &concertim).await;
    let mut fixtures = billable();
    fixtures.extend(deliveries("heat"));
    // The fixtures' samples are gauges, evidence of a launch and no usage: one metered sample
    // (10 units of the test meter, for project 447d2acd…) gives a team a cost to show.
    fixtures.push(usage_fixture());
    let fixtures: Vec<FixtureDelivery> = fixtures.into_iter().filter(|d| bus.routes(d)).collect();
    let named = named(&fixtures);
    for p in &named.projects {
        concertim.add_team(p);
    }
    for i in &named.instances {
        concertim.add_device(i, "IN_PROGRESS");
    }
    for s in &named.stacks {
        concertim.add_rack(s, "IN_PROGRESS");
    }
    let app = spawn_app(&bus, KillBill::new(kb.settings()).unwrap(), None).await;
    for d in &fixtures {
        bus.publish(d).await;
    }

    let gone = [
        "2dc673b9-8b8f-dcab-44c5-c769c9d8677c",
        "7e114a35-f244-0227-f164-345b7c68a2cc",
        "31d87a72-5789-ae55-d81e-bbb2804c854f",
    ];
    let active = ["98ef5e1a-58b0-6119-4bab-e976a1f174f2", "7366c705-2e6a-ca70-dc09-95e8a13c84f1"];
    let racks = [
        ("88ebda5f-b2e5-32e3-180d-d46dbf88a31a", Some("ACTIVE")),
        // create, suspend, then a failed resume (a `.error` event): FAILED.
        ("4b1f6a7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b", Some("FAILED")),
        ("9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d", None),
    ];
    // The metered sample was billed, so its team has a cost: 10 units at 0.01.
    let billed = ("447d2acdc8b5495f196db137db72105f", "0.10");
    let mismatches = || {
        let mut out = Vec::new();
        let cost = concertim.team(billed.0).and_then(|t| t.cost);
        if cost.as_deref() != Some(billed.1) {
            out.push(format!("team {}: cost {cost:?}, expected {}", billed.0, billed.1));
        }
        for i in gone {
            if let Some(d) = concertim.device(i) {
                out.push(format!("device {i} still there ({})", d.status));
            }
        }
        for i in active {
            let status = concertim.device(i).map(|d| d.status);
            if status.as_deref() != Some("ACTIVE") {
                out.push(format!("device {i}: {status:?}"));
            }
        }
        for (s, status) in racks {
            let now = concertim.rack(s).map(|r| r.status);
            if now.as_deref() != status {
                out.push(format!("rack {s}: {now:?}, expected {status:?}"));
            }
        }
        for p in &named.projects {
            let team = concertim.team(p).unwrap();
            let cost = kb.upcoming_amount(p);
            // Credits are the credit balance (none here) minus the upcoming invoice.
            let expected = (kb.account_id(p), Some(money(cost)), Some(money(Decimal::ZERO - cost)));
            let shown = (team.billing_acct_id.clone(), team.cost.clone(), team.credits.clone());
            if shown != expected || !team.period_start.as_deref().is_some_and(|d| d.ends_with("-01")) {
                out.push(format!("team {p}: {shown:?} {:?}, expected {expected:?}", team.period_start));
            }
        }
        out
    };
    until_shown("Concertim to show the lifecycles", Duration::from_secs(30), mismatches).await;
    // The memory samples of a live device were pushed.
    let pushed = concertim.metrics();
    let device = concertim.device(active[0]).unwrap().id;
    assert!(
        pushed.iter().any(|(d, m)| *d == device && m["name"] == "ram_allocated" && m["type"] == "double"),
        "{pushed:?}"
    );
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0);
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

/// A legacy `create.end` for another instance of another project, with its own message id.
fn created(template: &FixtureDelivery, project: &str, instance: &str, n: usize) -> FixtureDelivery {
    let envelope: serde_json::Value = serde_json::from_slice(&template.body).unwrap();
    let mut message: serde_json::Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    message["message_id"] = serde_json::json!(format!("outage-{n:04}"));
    message["payload"]["instance_id"] = serde_json::json!(instance);
    message["payload"]["tenant_id"] = serde_json::json!(project);
    let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
    FixtureDelivery { body: serde_json::to_vec(&body).unwrap(), ..template.clone() }
}

/// A Keystone `project.created` for another project, with its own message id.
fn project_created(template: &FixtureDelivery, project: &str, n: usize) -> FixtureDelivery {
    let envelope: serde_json::Value = serde_json::from_slice(&template.body).unwrap();
    let mut message: serde_json::Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    message["message_id"] = serde_json::json!(format!("outage-project-{n:04}"));
    message["payload"]["resource_info"] = serde_json::json!(project);
    let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
    FixtureDelivery { body: serde_json::to_vec(&body).unwrap(), ..template.clone() }
}

fn legacy(event_type: &str) -> FixtureDelivery {
    deliveries("nova-legacy")
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains(&format!("\\\"event_type\\\": \\\"{event_type}\\\"")))
        .unwrap_or_else(|| panic!("no {event_type} in the legacy lifecycle"))
}

#[tokio::test]
async fn concertim_down_for_a_minute_holds_no_billing_up_and_catches_up_after() {
    let kb = FakeKillBill::start().await;
    let concertim = FakeConcertim::start().await;
    let mut bus = concertim_bus("concertim-outage", &concertim).await;
    // Patient enough for a minute's outage: 40 attempts, 2 s apart.
    if let Some(c) = bus.settings.concertim.as_mut() {
        c.retry_delay_ms = 2_000;
        c.max_attempts = 40;
    }
    let template = legacy("compute.instance.create.end");
    let instances: Vec<(String, String)> = (0..20)
        .map(|i| (format!("{:032x}", 0xfeed_0000_u64 + i / 4), format!("00000000-0000-4000-8000-{i:012x}")))
        .collect();
    let projects: BTreeSet<&String> = instances.iter().map(|(p, _)| p).collect();
    for project in &projects {
        concertim.add_team(project);
    }
    for (_, instance) in &instances {
        concertim.add_device(instance, "IN_PROGRESS");
    }
    concertim.set_down(true);
    let down_at = std::time::Instant::now();
    let app = spawn_app(&bus, KillBill::new(kb.settings()).unwrap(), None).await;
    let project_template = legacy("identity.project.created");
    for (n, project) in projects.iter().enumerate() {
        bus.publish(&project_created(&project_template, project, n)).await;
    }
    for (n, (project, instance)) in instances.iter().enumerate() {
        bus.publish(&created(&template, project, instance, n)).await;
    }

    // Billing is done while Concertim is still down, and Concertim was being tried.
    eventually("billing to be done while Concertim is down", Duration::from_secs(30), || async {
        let s = kb.snapshot();
        (s.subscriptions.len() == instances.len() && bus.depth(&bus.names().queue).await == 0).then_some(())
    })
    .await;
    assert!(instances.iter().all(|(_, i)| concertim.device(i).unwrap().status == "IN_PROGRESS"));
    eventually("Concertim to be tried", Duration::from_secs(10), || async { (concertim.requests() > 0).then_some(()) })
        .await;
    // A minute's outage, observed on Concertim's side: nothing is given up meanwhile.
    eventually("a minute of outage", Duration::from_secs(70), || async {
        (down_at.elapsed() >= Duration::from_secs(60)).then_some(())
    })
    .await;
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0, "nothing is dead-lettered during the outage");
    concertim.set_down(false);

    until_shown("Concertim to catch up", Duration::from_secs(60), || {
        let mut left = Vec::new();
        for (p, i) in &instances {
            let status = concertim.device(i).map(|d| d.status);
            if status.as_deref() != Some("ACTIVE") {
                left.push(format!("device {i}: {status:?}"));
            }
            let team = concertim.team(p).and_then(|t| t.billing_acct_id);
            if team != kb.account_id(p) {
                left.push(format!("team {p}: {team:?}"));
            }
        }
        left
    })
    .await;
    let concertim_queue = Names::concertim(&bus.settings.bus);
    assert_eq!(bus.depth(&concertim_queue.queue).await, 0);
    assert_eq!(bus.depth(&concertim_queue.retry_queue).await, 0);
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0);
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

#[tokio::test]
async fn a_team_created_after_its_project_is_linked_at_its_next_refresh_and_another_account_is_never_overwritten() {
    let kb = FakeKillBill::start().await;
    let concertim = FakeConcertim::start().await;
    let bus = concertim_bus("concertim-link", &concertim).await;
    // A team linked to another account (a previous billing service's) before this one starts.
    let linked = "5d3696b4bbd8c47da660fc0893f44d54";
    concertim.add_team(linked);
    concertim.set_team_account(linked, "account-of-the-python-service");
    let created = deliveries("keystone")
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains("identity.project.created"))
        .unwrap();
    // The usage fixture's project has no team yet.
    let late = "447d2acdc8b5495f196db137db72105f";
    let app = spawn_app(&bus, KillBill::new(kb.settings()).unwrap(), None).await;
    bus.publish(&created).await;
    let usage = usage_batch(&usage_fixture(), 4);
    bus.publish(&usage[0]).await;
    eventually("both accounts and the first usage", Duration::from_secs(20), || async {
        (kb.account_id(linked).is_some() && kb.usage_rows() == 1).then_some(())
    })
    .await;
    // The linked team's figures are refreshed; its account id stays the one it had.
    eventually("the linked team's figures", Duration::from_secs(20), || async {
        concertim.team(linked).and_then(|t| t.cost).map(|_| ())
    })
    .await;
    assert_eq!(concertim.team(linked).unwrap().billing_acct_id.as_deref(), Some("account-of-the-python-service"));
    // The team appears; the project's next usage refreshes it, and links it first.
    concertim.add_team(late);
    bus.publish(&usage[1]).await;
    eventually("the late team to be linked", Duration::from_secs(20), || async {
        let team = concertim.team(late)?;
        (team.billing_acct_id.is_some() && team.billing_acct_id == kb.account_id(late)).then_some(())
    })
    .await;
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0);
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

/// The Python service made the team's account in KillBill (no externalKey, the project id in
/// `project_cloud_id`) and linked the team to it. That account is the project's here too
/// (adopted): linking the team finds it the same, so nothing conflicts and `billing_acct_id` is
/// never written, and the team's figures are that account's.
#[tokio::test]
async fn a_team_linked_to_the_account_the_python_service_made_keeps_it_with_killbill() {
    let server = KillBillServer::start().await;
    let concertim = FakeConcertim::start().await;
    let project = "5d3696b4bbd8c47da660fc0893f44d54";
    let python = server.python_account(project, "project_cloud_id").await;
    concertim.add_team(project);
    concertim.set_team_account(project, &python);
    let mut settings = concertim.settings();
    settings.team_refresh_interval_ms = 0;
    let worker = Arc::new(Worker::new(settings, Arc::new(server.client())).unwrap());
    let project_id = ProjectId::parse(project).unwrap();
    let linked = worker.apply(&Update::LinkTeam { project: project_id.clone() }).await.unwrap();
    assert_eq!(linked, Done::Unchanged, "the team names the project's own account: no conflict");
    let refresh = worker.apply(&Update::RefreshTeam { project: project_id }).await.unwrap();
    assert_eq!(refresh, Done::Scheduled);
    eventually("the team's figures", Duration::from_secs(30), || async {
        concertim.team(project).and_then(|t| t.cost).map(|_| ())
    })
    .await;
    let team = concertim.team(project).unwrap();
    assert_eq!(team.billing_acct_id.as_deref(), Some(python.as_str()));
    assert_eq!(concertim.team_account_updates(), 0, "billing_acct_id never written");
    assert_eq!(server.account_keyed(project).await, None, "no second account keyed by the project");
}

#[tokio::test]
async fn a_settlement_pass_that_bills_a_project_refreshes_its_teams_figures() {
    let kb = FakeKillBill::start().await;
    let concertim = FakeConcertim::start().await;
    let mut bus = concertim_bus("concertim-settled", &concertim).await;
    bus.settings.billing.time.settle_every_s = 1;
    bus.settings.billing.time.grace_s = 0;
    let project = "0123456789abcdef0123456789abcdef";
    let instance = "00000000-0000-4000-8000-00000000b001";
    concertim.add_team(project);
    concertim.add_device(instance, "IN_PROGRESS");
    // An instance launched three hours ago: its whole hours are due as soon as the bus is idle.
    let create = launched(project, instance, 1, 3);
    let app = spawn_app(&bus, KillBill::new(kb.settings()).unwrap(), None).await;
    bus.publish(&create).await;
    // A create asks Concertim for the device's status only; the team's figures change when the
    // settlement bills the hours.
    eventually("the settlement to bill the hours and refresh the team", Duration::from_secs(60), || async {
        (kb.usage_rows() > 0 && concertim.team_figure_updates() > 0).then_some(())
    })
    .await;
    assert!(concertim.team(project).unwrap().cost.is_some());
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0);
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

/// A legacy `create.end` of an instance of `project` launched `hours` ago.
fn launched(project: &str, instance: &str, n: usize, hours: i64) -> FixtureDelivery {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let at = concertim_billing::event::Timestamp::from_unix(now as i64 - hours * 3_600).unwrap().to_rfc3339();
    let template = created(&legacy("compute.instance.create.end"), project, instance, n);
    let envelope: serde_json::Value = serde_json::from_slice(&template.body).unwrap();
    let mut message: serde_json::Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    message["timestamp"] = serde_json::json!(at);
    message["payload"]["launched_at"] = serde_json::json!(at);
    let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
    FixtureDelivery { body: serde_json::to_vec(&body).unwrap(), ..template }
}

/// The instances of [`CostedTeam`], by rack: rack A holds two, rack B one.
const RACK_A: [&str; 2] = ["00000000-0000-4000-8000-0000000c0a01", "00000000-0000-4000-8000-0000000c0a02"];
const RACK_B: [&str; 1] = ["00000000-0000-4000-8000-0000000c0b01"];

/// A team whose project runs three instances in two racks of the team, launched three, two and
/// one hour ago, with a bus that settles every second (their whole hours are billed as soon as
/// the bus is idle).
struct CostedTeam {
    project: &'static str,
    bus: TestBus,
    launches: Vec<FixtureDelivery>,
}

async fn costed_team(test: &str, project: &'static str, concertim: &FakeConcertim) -> CostedTeam {
    let mut bus = concertim_bus(test, concertim).await;
    bus.settings.billing.time.settle_every_s = 1;
    bus.settings.billing.time.grace_s = 0;
    concertim.add_team(project);
    let a = concertim.add_team_rack("stack-a", project);
    let b = concertim.add_team_rack("stack-b", project);
    for i in RACK_A {
        concertim.add_device_in(i, a);
    }
    for i in RACK_B {
        concertim.add_device_in(i, b);
    }
    let instances = RACK_A.iter().chain(&RACK_B);
    let launches = instances.enumerate().map(|(n, i)| launched(project, i, 100 + n, 3 - n as i64)).collect();
    CostedTeam { project, bus, launches }
}

/// How Concertim's costs differ from the backend's figures (`devices`: each instance's cost;
/// `team`: the team's): every device shows its figure in cents (zero when the figures do not
/// name it), every rack the sum of its devices' costs, the team its cost, which is the sum of
/// its devices'. Nothing billed yet is a difference too: the test would prove nothing.
fn cost_mismatches(
    concertim: &FakeConcertim,
    project: &str,
    devices: &BTreeMap<String, Decimal>,
    team: Decimal,
) -> Vec<String> {
    let mut out = Vec::new();
    if team.is_zero() {
        out.push("the backend has billed nothing yet".to_owned());
    }
    let sum: Decimal = devices.values().sum();
    if sum != team {
        out.push(format!("the backend's resources sum to {sum}, its team cost is {team}"));
    }
    for (stack, instances) in [("stack-a", &RACK_A[..]), ("stack-b", &RACK_B[..])] {
        let mut rack_sum = Decimal::ZERO;
        for i in instances {
            let expected = devices.get(*i).copied().unwrap_or_default().round_dp(2);
            let shown = concertim.device(i).map(|d| d.cost).unwrap_or_default();
            if shown != expected {
                out.push(format!("device {i}: cost {shown}, expected {expected}"));
            }
            rack_sum += shown;
        }
        let shown = concertim.rack(stack).map(|r| r.cost_text());
        if shown != Some(money(rack_sum)) {
            out.push(format!("rack {stack}: cost {shown:?}, expected the sum of its devices {}", money(rack_sum)));
        }
    }
    let shown = concertim.team(project).and_then(|t| t.cost);
    if shown != Some(money(team)) {
        out.push(format!("team: cost {shown:?}, expected {}", money(team)));
    }
    out
}

fn today() -> time::Date {
    time::OffsetDateTime::now_utc().date()
}

#[tokio::test]
async fn with_the_ledger_concertim_shows_each_devices_rack_and_team_cost_as_the_ledger_prices_them() {
    let concertim = FakeConcertim::start().await;
    let costed = costed_team("concertim-costs-ledger", "c05750000000000000000000000000a1", &concertim).await;
    let app = spawn_app(&costed.bus, Ledger::in_memory(), None).await;
    for d in &costed.launches {
        costed.bus.publish(d).await;
    }
    let ledger = app.executor.billing();
    let catalog = Catalog::bundled().unwrap();
    eventually_with("Concertim to show the ledger's costs", Duration::from_secs(60), || {
        // The ledger's priced items of the current period, by resource (bundled prices, each
        // item rounded to cents by the catalog).
        let now = Timestamp::from_unix(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap();
        let mut devices: BTreeMap<String, Decimal> = BTreeMap::new();
        for c in ledger.costs(catalog).into_iter().filter(|c| c.period.0 <= now && now < c.period.1) {
            *devices.entry(c.resource.to_string()).or_default() += c.item.amount;
        }
        let team = devices.values().sum();
        let left = cost_mismatches(&concertim, costed.project, &devices, team);
        nothing_left(left)
    })
    .await;
    assert_eq!(costed.bus.depth(&costed.bus.names().dead_queue).await, 0);
    app.shutdown().await.unwrap();
    costed.bus.cleanup().await;
}

#[tokio::test]
async fn with_killbill_concertim_shows_each_devices_rack_and_team_cost_as_the_dry_run_invoice_has_them() {
    let server = KillBillServer::start().await;
    if let KillBillServer::Fake(fake) = &server {
        // The fake prices usage at the test's prices (whole cents an hour); the real server at
        // the bundled catalog's.
        fake.set_price("openstack-instance-seconds", Decimal::new(1, 4));
        fake.set_price("openstack-vcpu-seconds", Decimal::new(2, 4));
    }
    let concertim = FakeConcertim::start().await;
    let costed = costed_team("concertim-costs-killbill", "c05750000000000000000000000000b2", &concertim).await;
    let app = spawn_app(&costed.bus, server.client(), None).await;
    for d in &costed.launches {
        costed.bus.publish(d).await;
    }
    eventually_with("Concertim to show KillBill's dry-run invoice", Duration::from_secs(120), || {
        let (server, concertim, project) = (&server, &concertim, costed.project);
        async move {
            // The upcoming invoice as the test reads it itself: its amount, and its items by
            // the subscriptions' external keys.
            let (amount, devices) = server.upcoming_invoice(project, today()).await.unwrap_or_default();
            let left = cost_mismatches(concertim, project, &devices, amount);
            if left.is_empty() {
                Ok(())
            } else {
                Err(left)
            }
        }
    })
    .await;
    assert_eq!(costed.bus.depth(&costed.bus.names().dead_queue).await, 0);
    app.shutdown().await.unwrap();
    costed.bus.cleanup().await;
}

#[tokio::test]
async fn with_hostbill_concertim_shows_each_devices_rack_and_team_cost_as_hostbill_charges_them() {
    let hostbill = FakeHostBill::start().await;
    // Whole cents an hour: 0.36 per instance-hour, 0.72 per vCPU-hour; other variables are free.
    hostbill.set_price("openstack-instance-seconds", Decimal::new(1, 4));
    hostbill.set_price("openstack-vcpu-seconds", Decimal::new(2, 4));
    let concertim = FakeConcertim::start().await;
    let costed = costed_team("concertim-costs-hostbill", "c05750000000000000000000000000c3", &concertim).await;
    let products =
        [("openstack-standard-monthly", "1"), ("openstack-large-monthly", "2"), ("openstack-small-monthly", "3")];
    let app = spawn_app(&costed.bus, HostBill::new(hostbill.settings(&products)).unwrap(), None).await;
    for d in &costed.launches {
        costed.bus.publish(d).await;
    }
    let credit = Decimal::new(2_500, 2);
    eventually("the project's HostBill client", Duration::from_secs(30), || async {
        hostbill.state().clients.contains(costed.project).then_some(())
    })
    .await;
    hostbill.set_credit(costed.project, credit);
    eventually_with("Concertim to show HostBill's charges", Duration::from_secs(60), || {
        let devices = hostbill.charges();
        let team: Decimal = devices.values().sum();
        let mut left = cost_mismatches(&concertim, costed.project, &devices, team);
        // Credits are the client's credit minus the charges.
        let credits = concertim.team(costed.project).and_then(|t| t.credits);
        if credits != Some(money(credit - team)) {
            left.push(format!("team credits {credits:?}, expected {}", money(credit - team)));
        }
        nothing_left(left)
    })
    .await;
    assert_eq!(costed.bus.depth(&costed.bus.names().dead_queue).await, 0);
    app.shutdown().await.unwrap();
    costed.bus.cleanup().await;
}

#[tokio::test]
async fn an_expired_token_costs_one_login_and_the_retried_answer_is_used() {
    let kb = FakeKillBill::start().await;
    let concertim = FakeConcertim::start().await;
    let bus = concertim_bus("concertim-token", &concertim).await;
    let template = legacy("compute.instance.create.end");
    let project = "0123456789abcdef0123456789abcdef";
    let first = "00000000-0000-4000-8000-00000000a001";
    concertim.add_team(project);
    concertim.add_device(first, "IN_PROGRESS");
    let app = spawn_app(&bus, KillBill::new(kb.settings()).unwrap(), None).await;
    bus.publish(&created(&template, project, first, 1)).await;
    eventually("the first device to be ACTIVE", Duration::from_secs(20), || async {
        concertim.device(first).is_some_and(|d| d.status == "ACTIVE").then_some(())
    })
    .await;
    assert_eq!(concertim.logins(), 1);

    // The token expires mid-stream; the next device is unknown to the cache, so the worker's
    // first call is the device list: 401, one login, the list again, and the device found in
    // that second answer is the one updated.
    concertim.expire_tokens();
    let second = "00000000-0000-4000-8000-00000000a002";
    concertim.add_device(second, "IN_PROGRESS");
    bus.publish(&created(&template, project, second, 2)).await;
    eventually("the second device to be ACTIVE", Duration::from_secs(20), || async {
        concertim.device(second).is_some_and(|d| d.status == "ACTIVE").then_some(())
    })
    .await;
    assert_eq!(concertim.logins(), 2);
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0);
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

#[tokio::test]
async fn a_burst_of_a_thousand_samples_refreshes_the_team_at_most_once_per_interval() {
    let kb = FakeKillBill::start().await;
    kb.set_price(TEST_UNIT, Decimal::new(1, 2));
    let concertim = FakeConcertim::start().await;
    let mut bus = concertim_bus("concertim-burst", &concertim).await;
    let interval = Duration::from_millis(1_000);
    if let Some(c) = bus.settings.concertim.as_mut() {
        c.team_refresh_interval_ms = interval.as_millis() as u64;
    }
    // A thousand metered samples (10 units of the test meter each) for one project's instance.
    let project = "447d2acdc8b5495f196db137db72105f";
    concertim.add_team(project);
    let burst = usage_batch(&usage_fixture(), 1_000);
    let app = spawn_app(&bus, KillBill::new(kb.settings()).unwrap(), None).await;
    let started = std::time::Instant::now();
    for d in &burst {
        bus.publish(d).await;
    }
    eventually("the burst to be billed", Duration::from_secs(120), || async {
        (kb.usage_rows() == 1_000).then_some(())
    })
    .await;
    let billed_in = started.elapsed();
    let expected = money(kb.upcoming_amount(project));
    eventually("the team to show the whole burst", Duration::from_secs(20), || async {
        concertim.team(project).is_some_and(|t| t.cost.as_deref() == Some(expected.as_str())).then_some(())
    })
    .await;
    // One refresh per interval while the burst lasted, plus the trailing one.
    let allowed = (billed_in.as_millis() / interval.as_millis()) as usize + 2;
    let refreshes = concertim.team_figure_updates();
    assert!(
        (1..=allowed).contains(&refreshes),
        "{refreshes} refreshes for a burst of {billed_in:?} (at most {allowed})"
    );
    // 1000 samples × 10 units × 0.01.
    assert_eq!(expected, money(Decimal::from(10_000) * Decimal::new(1, 2)));
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

#[tokio::test]
async fn an_exhausted_concertim_update_is_dead_lettered_alone_and_requeued_after_the_fix() {
    let kb = FakeKillBill::start().await;
    let concertim = FakeConcertim::start().await;
    let mut bus = concertim_bus("concertim-exhausted", &concertim).await;
    if let Some(c) = bus.settings.concertim.as_mut() {
        c.max_attempts = 2;
    }
    let project = "fedcba9876543210fedcba9876543210";
    let instance = "00000000-0000-4000-8000-00000000b001";
    concertim.add_team(project);
    concertim.add_device(instance, "IN_PROGRESS");
    concertim.set_down(true);
    let app = spawn_app(&bus, KillBill::new(kb.settings()).unwrap(), None).await;
    bus.publish(&created(&legacy("compute.instance.create.end"), project, instance, 1)).await;

    let dead = bus.names().dead_queue;
    eventually("the Concertim update to be dead-lettered", Duration::from_secs(30), || async {
        (bus.depth(&dead).await == 1).then_some(())
    })
    .await;
    // Billing was done; only the Concertim update is in the dead-letter queue, with its reason.
    assert_eq!(kb.snapshot().subscriptions.len(), 1);
    let listed = crate::support::bus::cli_command(&bus).args(["dlq", "list", "--json"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("concertim compute.instance.create.end"), "{listed}");
    assert!(listed.contains("exhausted after 2 attempts") && listed.contains("503"), "{listed}");

    concertim.set_down(false);
    let requeued = crate::support::bus::cli_command(&bus).args(["dlq", "requeue", "--all"]).output().unwrap();
    assert!(requeued.status.success(), "{}", String::from_utf8_lossy(&requeued.stderr));
    eventually("the requeued update to be applied", Duration::from_secs(20), || async {
        concertim.device(instance).is_some_and(|d| d.status == "ACTIVE").then_some(())
    })
    .await;
    assert_eq!(bus.depth(&dead).await, 0);
    assert_eq!(kb.snapshot().subscriptions.len(), 1);
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

/// A Cinder notification about `volume` of `project`, as Cinder publishes it on its exchange:
/// the payload keys of the corpus's `cinder/searchlight/volumes.json` (a devstack capture), a
/// one-GiB volume attached to `attached_to` when that is set.
fn cinder(
    n: usize,
    event_type: &str,
    (project, volume): (&str, &str),
    status: &str,
    attached_to: Option<&str>,
    at: &str,
) -> FixtureDelivery {
    let attachments: Vec<serde_json::Value> = attached_to
        .map(|instance| {
            serde_json::json!({"instance_uuid": instance, "volume_id": volume, "attach_status": "attached",
                "attach_mode": "rw", "mountpoint": "/dev/vdb"})
        })
        .into_iter()
        .collect();
    let message = serde_json::json!({
        "message_id": format!("volume-{n:04}"),
        "event_type": event_type,
        "publisher_id": "volume.devstack@lvmdriver-1",
        "priority": "INFO",
        "timestamp": at,
        "payload": {
            "volume_id": volume, "tenant_id": project, "user_id": "3f7600957f0a444c98928d79debb72fb",
            "status": status, "size": 1, "volume_type": "3706aa72-cb65-4971-83e8-48e1477efd1d",
            "display_name": "scratch", "availability_zone": "nova", "snapshot_id": null, "metadata": [],
            "created_at": "2025-01-01T00:00:00+00:00", "launched_at": "2025-01-01T00:00:01+00:00",
            "volume_attachment": attachments,
        },
    });
    let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
    FixtureDelivery {
        exchange: Some("cinder".into()),
        routing_key: Some("notifications.info".into()),
        properties: None,
        redelivered: false,
        body: serde_json::to_vec(&body).unwrap(),
    }
}

#[tokio::test]
async fn a_volume_created_attached_detached_and_deleted_shows_each_status_on_its_device_then_goes() {
    let concertim = FakeConcertim::start().await;
    let mut bus = concertim_bus("concertim-volume", &concertim).await;
    let exchange = bus.exchange("cinder");
    bus.settings.bus.bindings.push(Binding { exchange, routing_key: "notifications.info".into() });
    let project = "1816a16093df465dbc609cf638422a05";
    let volume = "f54b1d2f-4514-4688-8da7-4bc66767b6be";
    let instance = "ae81266c-a292-4e48-bf81-a3894bd62f4a";
    // Concertim shows the volume from when its stack made it, while Cinder was still creating it.
    concertim.add_volume(volume, "IN_PROGRESS");
    // The subject is Concertim: the volume is billed into the in-memory ledger.
    let app = spawn_app(&bus, Ledger::in_memory(), None).await;
    let id = (project, volume);
    let lifecycle = [
        cinder(1, "volume.create.end", id, "available", None, "2025-01-01 00:00:02.000000"),
        cinder(2, "volume.attach.end", id, "in-use", Some(instance), "2025-01-01 00:01:00.000000"),
        cinder(3, "volume.detach.end", id, "available", None, "2025-01-01 00:02:00.000000"),
        cinder(4, "volume.delete.end", id, "deleting", None, "2025-01-01 00:03:00.000000"),
    ];
    for d in &lifecycle {
        bus.publish(d).await;
    }

    eventually("the volume's device to be removed", Duration::from_secs(20), || async {
        concertim.device_history(volume).last().is_some_and(|last| last == "removed").then_some(())
    })
    .await;
    // Available once created, active while attached, available again, then gone.
    assert_eq!(concertim.device_history(volume), ["AVAILABLE", "ACTIVE", "AVAILABLE", "removed"]);
    assert!(concertim.device(volume).is_none());
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0);
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

/// What an `eventually_with` check answers: done, or what is still left.
async fn nothing_left(left: Vec<String>) -> Result<(), Vec<String>> {
    if left.is_empty() {
        Ok(())
    } else {
        Err(left)
    }
}
