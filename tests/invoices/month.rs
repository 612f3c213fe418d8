//! A month of instance lives, settled into the real KillBill and invoiced: every USAGE item is
//! the seconds each flavor was held, times its size, times the catalog's price of its plan.
//!
//! One project, six instances in November 2026, as legacy Nova notifications (the shape of the
//! fixture's `compute.instance.create.end`, with event, time, flavor, state and lifecycle times
//! replaced), through an executor over the KillBill backend, then one settlement as of
//! 2026-12-01T00:00:00Z, with KillBill's clock at 2026-11-30T23:00:00Z. The first instance
//! launches on the 1st, so the account's billing day is the 1st. KillBill invoices a cancelled
//! subscription's usage at once (the settlement posts every period before it cancels), and the
//! running instance's month on the billing day, once the clock passes 2026-12-01.

use std::collections::BTreeMap;

use concertim_billing::{
    config::{Settings, DEFAULT_TOML},
    fixture::FixtureDelivery,
};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::{
    helpers::{bill_november, invoiced, priced, print_invoices, set_clock, CLOCK},
    support::{
        deliveries,
        killbill_server::{real_url, RealKillBill},
    },
};

/// The one project (the account's external key).
const PROJECT: &str = "5e7a1c0d9b8f4e2a8c6d4b2a0f1e3d5c";

/// A flavor as Nova's legacy payload gives it (no ephemeral disk). Memory is whole GiB: KillBill
/// 0.22 stores usage amounts as whole numbers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flavor {
    name: &'static str,
    vcpus: u64,
    memory_mb: u64,
    root_gb: u64,
}

/// Billed on the default plan, openstack-standard-monthly.
pub(crate) const SMALL: Flavor = Flavor { name: "m1.small", vcpus: 1, memory_mb: 2048, root_gb: 20 };
/// Billed on openstack-large-monthly.
const LARGE: Flavor = Flavor { name: "m1.large", vcpus: 4, memory_mb: 8192, root_gb: 80 };
/// Billed on openstack-compute-monthly.
const COMPUTE: Flavor = Flavor { name: "c1.medium", vcpus: 2, memory_mb: 4096, root_gb: 40 };

/// The flavors' plans, as an operator writes them.
pub(crate) fn settings() -> Settings {
    let plans =
        "[billing.plans]\n\"m1.large\" = \"openstack-large-monthly\"\n\"c1.medium\" = \"openstack-compute-monthly\"\n";
    let settings = Settings::from_toml(&DEFAULT_TOML.replace("[billing.plans]\n", plans), "test").unwrap();
    // The default policy: a stopped instance is billed as if running.
    assert_eq!(settings.billing.time.policy(), concertim_billing::timeline::Policy::default());
    settings
}

/// One instance.
pub(crate) struct Vm {
    /// Its uuid.
    pub(crate) id: &'static str,
    /// Its display name.
    pub(crate) name: &'static str,
}

const WHOLE_MONTH: Vm = Vm { id: "0a000000-0000-4000-8000-00000000000a", name: "whole-month" };
const RESIZED: Vm = Vm { id: "0b000000-0000-4000-8000-00000000000b", name: "resized" };
const SHELVED: Vm = Vm { id: "0c000000-0000-4000-8000-00000000000c", name: "shelved" };
const DELETE_FIRST: Vm = Vm { id: "0d000000-0000-4000-8000-00000000000d", name: "delete-first" };
const FAILED: Vm = Vm { id: "0e000000-0000-4000-8000-00000000000e", name: "failed-build" };
const STOPPED: Vm = Vm { id: "0f000000-0000-4000-8000-00000000000f", name: "stopped" };

/// A legacy Nova notification `compute.instance.<event>` about `vm`, sent at `sent` (in November
/// 2026: `"MM-DD hh:mm:ss.ffffff"`), carrying `flavor`, `state` and `[launched_at, terminated_at,
/// deleted_at]` (`"MM-DD hh:mm:ss"`, or "" for unset, as legacy Nova writes them).
fn nova(vm: &Vm, flavor: Flavor, event: &str, sent: &str, state: &str, times: [&str; 3]) -> FixtureDelivery {
    nova_in(PROJECT, vm, flavor, event, sent, state, times)
}

/// As [`nova`], about an instance of `project`.
pub(crate) fn nova_in(
    project: &str,
    vm: &Vm,
    flavor: Flavor,
    event: &str,
    sent: &str,
    state: &str,
    times: [&str; 3],
) -> FixtureDelivery {
    let template = deliveries("nova-legacy")
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains(r#"\"event_type\": \"compute.instance.create.end\""#))
        .expect("fixtures/nova-legacy/lifecycle.jsonl has a create.end");
    let envelope: Value = serde_json::from_slice(&template.body).unwrap();
    let mut message: Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    let sent = format!("2026-{sent}");
    let time = |t: &str| if t.is_empty() { String::new() } else { format!("2026-{}.000000", t.replace(' ', "T")) };
    message["message_id"] = format!("{}.{event}.{}", vm.name, sent.replace(' ', "T")).into();
    message["event_type"] = format!("compute.instance.{event}").into();
    message["timestamp"] = sent.into();
    message["_context_project_id"] = project.into();
    let payload = &mut message["payload"];
    for (field, value) in [
        ("tenant_id", json!(project)),
        ("instance_id", json!(vm.id)),
        ("display_name", json!(vm.name)),
        ("hostname", json!(vm.name)),
        ("instance_type", json!(flavor.name)),
        ("vcpus", json!(flavor.vcpus)),
        ("memory_mb", json!(flavor.memory_mb)),
        ("root_gb", json!(flavor.root_gb)),
        ("disk_gb", json!(flavor.root_gb)),
        ("ephemeral_gb", json!(0)),
        ("state", json!(state)),
        ("launched_at", json!(time(times[0]))),
        ("terminated_at", json!(time(times[1]))),
        ("deleted_at", json!(time(times[2]))),
    ] {
        payload[field] = value;
    }
    let body = json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
    FixtureDelivery { body: serde_json::to_vec(&body).unwrap(), ..template }
}

/// The month's notifications, in the order they are delivered.
fn november() -> Vec<FixtureDelivery> {
    let whole = |event: &str, sent: &str, state: &str, times| nova(&WHOLE_MONTH, SMALL, event, sent, state, times);
    let resized = |event: &str, sent: &str, state: &str, times| nova(&RESIZED, SMALL, event, sent, state, times);
    // The same instance once resized to m1.large.
    let grown = |event: &str, sent: &str, state: &str, times| nova(&RESIZED, LARGE, event, sent, state, times);
    let shelved = |event: &str, sent: &str, state: &str, times| nova(&SHELVED, SMALL, event, sent, state, times);
    let delete_first =
        |event: &str, sent: &str, state: &str, times| nova(&DELETE_FIRST, SMALL, event, sent, state, times);
    let failed = |event: &str, sent: &str, state: &str, times| nova(&FAILED, SMALL, event, sent, state, times);
    let stopped = |event: &str, sent: &str, state: &str, times| nova(&STOPPED, COMPUTE, event, sent, state, times);
    let none = ["", "", ""];
    vec![
        // Running the whole month from its launch on the 1st (so the billing day is the 1st).
        whole("create.start", "11-01 00:16:40.100000", "building", none),
        whole("create.end", "11-01 00:17:05.912345", "active", ["11-01 00:17:05", "", ""]),
        // Resized mid-hour from m1.small to m1.large (the resize's launched_at starts the new
        // flavor), then deleted.
        resized("create.end", "11-03 09:00:41.998877", "active", ["11-03 09:00:41", "", ""]),
        // Shelved (stopped: billed), offloaded (no host holds it: not billed), unshelved (a new
        // launch), deleted.
        shelved("create.end", "11-05 08:12:09.400000", "active", ["11-05 08:12:09", "", ""]),
        shelved("shelve.end", "11-06 10:00:30.700000", "shelved", ["11-05 08:12:09", "", ""]),
        shelved("shelve_offload.end", "11-06 10:02:47.300000", "shelved_offloaded", ["11-05 08:12:09", "", ""]),
        shelved("unshelve.end", "11-08 16:45:12.600000", "active", ["11-08 16:45:12", "", ""]),
        shelved("delete.end", "11-09 11:11:13", "deleted", ["11-08 16:45:12", "11-09 11:11:11", "11-09 11:11:12"]),
        resized("resize.prep.start", "11-10 14:20:00.000100", "active", ["11-03 09:00:41", "", ""]),
        grown("finish_resize.end", "11-10 14:26:30.250000", "resized", ["11-10 14:26:30", "", ""]),
        grown("delete.start", "11-12 09:40:00.000001", "active", ["11-10 14:26:30", "", ""]),
        grown("delete.end", "11-12 09:40:03", "deleted", ["11-10 14:26:30", "11-12 09:40:01", "11-12 09:40:02"]),
        // Deleted before its create is processed: the delete.end is delivered first.
        delete_first("delete.end", "11-15 02:15:43", "deleted", ["11-14 20:30:00", "11-15 02:15:41", "11-15 02:15:42"]),
        delete_first("create.end", "11-14 20:30:00.500000", "active", ["11-14 20:30:00", "", ""]),
        // A failed build: no launched_at in any of its notifications, then deleted.
        failed("create.start", "11-17 13:00:00", "building", none),
        failed("create.error", "11-17 13:00:09", "error", none),
        failed("delete.end", "11-17 13:05:02", "deleted", ["", "11-17 13:05:01", "11-17 13:05:01"]),
        // Stopped for most of a day (the default policy bills stopped time as running), deleted.
        stopped("create.end", "11-20 06:06:06.660000", "active", ["11-20 06:06:06", "", ""]),
        stopped("power_off.end", "11-21 12:00:00.250000", "stopped", ["11-20 06:06:06", "", ""]),
        stopped("power_on.end", "11-22 08:30:15.750000", "active", ["11-20 06:06:06", "", ""]),
        stopped("delete.end", "11-25 17:46:00", "deleted", ["11-20 06:06:06", "11-25 17:45:59", "11-25 17:46:00"]),
    ]
}

/// One USAGE item as expected: the instance, its plan, the seconds each flavor was held in the
/// item's interval, and the item's amount in USD.
struct Expected {
    vm: &'static Vm,
    plan: &'static str,
    held: &'static [(Flavor, i64)],
    usd: &'static str,
}

/// The invoice of 2026-12-01, by hand. Unit prices per second, from deploy/killbill/catalog.xml
/// (instance, vCPU, GiB of RAM, GiB of disk):
/// - standard: 0.000001, 0.00001, 0.000002, 0.00000003, so an m1.small second (1 vCPU, 2 GiB,
///   20 GiB) costs 0.000001 + 0.00001 + 2 × 0.000002 + 20 × 0.00000003 = 0.0000156;
/// - large: 0.00000095, 0.0000095, 0.0000019, 0.00000003: an m1.large second (4, 8, 80) costs
///   0.00000095 + 0.000038 + 0.0000152 + 0.0000024 = 0.00005655, an m1.small second 0.00001485;
/// - compute: 0.0000009, 0.000009, 0.0000018, 0.00000003: a c1.medium second (2, 4, 40) costs
///   0.0000009 + 0.000018 + 0.0000072 + 0.0000012 = 0.0000273.
///
/// Each item is rounded once, to the cent, half up.
const EXPECTED: [Expected; 6] = [
    // Launched 11-01 00:17:05, running at the horizon 12-01 00:00:00:
    // 30 × 86 400 − 1 025 = 2 590 975 s × 0.0000156 = 40.41921 → 40.42.
    Expected { vm: &WHOLE_MONTH, plan: "openstack-standard-monthly", held: &[(SMALL, 2_590_975)], usd: "40.42" },
    // Launched 11-03 09:00:41 (m1.small), resized 11-10 14:26:30 (m1.large), terminated
    // 11-12 09:40:01. KillBill 0.22 keeps dates as days: the plan change is dated 11-10 and each
    // hour's records are dated by their day, so the standard plan bills 11-03 09:00:41 → 11-10
    // 00:00:00 = 6 × 86 400 + 53 959 = 572 359 s × 0.0000156 = 8.9288004 → 8.93, and the large
    // plan bills the rest of the life: m1.small 11-10 00:00:00 → 14:26:30 = 51 990 s × 0.00001485
    // = 0.7720515, plus m1.large 14:26:30 → 11-12 09:40:01 = 34 410 + 86 400 + 34 801 = 155 611 s
    // × 0.00005655 = 8.79980205; 9.57185355 → 9.57. (Split at the resize's instant, it would be
    // 9.74 and 8.80: a server with day dates cannot put two plans in one day.)
    Expected { vm: &RESIZED, plan: "openstack-standard-monthly", held: &[(SMALL, 572_359)], usd: "8.93" },
    Expected { vm: &RESIZED, plan: "openstack-large-monthly", held: &[(SMALL, 51_990), (LARGE, 155_611)], usd: "9.57" },
    // Launched 11-05 08:12:09, shelved 11-06 10:00:30 (stopped: billed), offloaded 10:02:47 (not
    // billed), unshelved 11-08 16:45:12, terminated 11-09 11:11:11: 86 400 + 6 638 = 93 038 s,
    // plus 66 359 s = 159 397 s × 0.0000156 = 2.4865932 → 2.49.
    Expected { vm: &SHELVED, plan: "openstack-standard-monthly", held: &[(SMALL, 159_397)], usd: "2.49" },
    // Launched 11-14 20:30:00, terminated 11-15 02:15:41 (the delete processed first):
    // 5 × 3 600 + 45 × 60 + 41 = 20 741 s × 0.0000156 = 0.3235596 → 0.32.
    Expected { vm: &DELETE_FIRST, plan: "openstack-standard-monthly", held: &[(SMALL, 20_741)], usd: "0.32" },
    // Launched 11-20 06:06:06, stopped 11-21 12:00:00, started 11-22 08:30:15 (all billed),
    // terminated 11-25 17:45:59: 5 × 86 400 + 41 993 = 473 993 s × 0.0000273 = 12.9400089 → 12.94.
    Expected { vm: &STOPPED, plan: "openstack-compute-monthly", held: &[(COMPUTE, 473_993)], usd: "12.94" },
];

/// 40.42 + 8.93 + 9.57 + 2.49 + 0.32 + 12.94.
const TOTAL_USD: &str = "74.67";

/// The quantities of each unit an item bills for `held`.
fn quantities(held: &[(Flavor, i64)]) -> BTreeMap<String, Decimal> {
    let mut units = BTreeMap::new();
    for (flavor, seconds) in held {
        let s = Decimal::from(*seconds);
        for (unit, per_second) in [
            ("openstack-instance-seconds", Decimal::ONE),
            ("openstack-vcpu-seconds", Decimal::from(flavor.vcpus)),
            ("openstack-memory-gib-seconds", Decimal::from(flavor.memory_mb) / Decimal::from(1024)),
            ("openstack-disk-gib-seconds", Decimal::from(flavor.root_gb)),
        ] {
            *units.entry(unit.to_owned()).or_insert(Decimal::ZERO) += s * per_second;
        }
    }
    units
}

#[tokio::test]
async fn a_month_of_instance_lives_is_invoiced_at_the_exact_seconds_times_the_catalog_prices() {
    // real_url() fails the test when CONCERTIM_BILLING_REQUIRE_KILLBILL is set (CI).
    let Some(url) = real_url() else {
        eprintln!("skipped: no real KillBill (CONCERTIM_BILLING_KILLBILL_URL); deploy/dev/test.sh starts one");
        return;
    };
    let _clock = CLOCK.lock().await;
    let real = RealKillBill::start(&url).await;
    let deliveries: Vec<(Vec<u8>, bool)> = november().into_iter().map(|d| (d.body, d.redelivered)).collect();
    let account_id = bill_november(&real, settings(), &deliveries, PROJECT).await;
    let bundles = real.get(&format!("/1.0/kb/accounts/{account_id}/bundles")).await;
    let mut subscribed: Vec<String> = bundles
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["subscriptions"].as_array().unwrap())
        .map(|s| s["externalKey"].as_str().unwrap().to_owned())
        .collect();
    subscribed.sort();
    let (failed_status, failed_body) =
        real.call(reqwest::Method::GET, &format!("/1.0/kb/subscriptions?externalKey={}", FAILED.id), None).await;
    let (items, invoice_totals) = invoiced(&real, &account_id).await;
    // Back to the real time before any assertion can fail.
    set_clock(&real, None).await;
    print_invoices(&items, &invoice_totals);

    // The failed build never launched: no subscription, and nothing invoiced for it.
    let mut expected_subscriptions: Vec<String> =
        [&WHOLE_MONTH, &RESIZED, &SHELVED, &DELETE_FIRST, &STOPPED].iter().map(|vm| vm.id.to_owned()).collect();
    expected_subscriptions.sort();
    assert_eq!(subscribed, expected_subscriptions);
    assert_eq!(failed_status, 404, "the failed build's subscription: {failed_body}");

    let mut seen = priced(&items);
    // Nothing but the expected items bills anything.
    seen.retain(|_, (units, amount)| !amount.is_zero() || units.values().any(|q| !q.is_zero()));
    let expected: BTreeMap<(String, String), (BTreeMap<String, Decimal>, Decimal)> = EXPECTED
        .iter()
        .map(|e| ((e.vm.id.to_owned(), e.plan.to_owned()), (quantities(e.held), e.usd.parse::<Decimal>().unwrap())))
        .collect();
    for (key, want) in &expected {
        let name = EXPECTED.iter().find(|e| e.vm.id == key.0).unwrap().vm.name;
        assert_eq!(seen.get(key), Some(want), "{name} on {}", key.1);
    }
    assert_eq!(seen.len(), expected.len(), "unexpected items: {seen:?}");
    let total: Decimal = invoice_totals.iter().map(|(_, amount, _)| *amount).sum();
    assert_eq!(total, TOTAL_USD.parse::<Decimal>().unwrap(), "the month's invoices");
}
