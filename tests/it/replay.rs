//! `concertim-billing replay`, run as an operator runs it.

use serde_json::Value;

use crate::support::{arg, run_cli};

fn report(stdout: &[u8]) -> Value {
    serde_json::from_slice(stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(stdout)))
}

fn billing_part(report: &Value) -> Value {
    serde_json::json!({
        "accounts": report["accounts"],
        "subscriptions": report["subscriptions"],
        "usage": report["usage"],
    })
}

/// Every instance of the fixtures is billed for the seconds it held each flavor (m1.small: 1
/// vCPU, 2 GiB, 20 GiB disk; m1.large: 4 vCPUs, 8 GiB, 80 GiB), checked by hand:
/// - nova-legacy 2dc673b9: launched 09:00:41 small, resized 09:26:30 (its new launched_at),
///   terminated 09:40:01 → 1549 s small + 811 s large = 2360 instance-s; vCPU 1549 + 4 × 811 =
///   4793; memory GiB 2 × 1549 + 8 × 811 = 9586; disk GiB 20 × 1549 + 80 × 811 = 95860. The
///   power-off at 09:35:04 changes nothing under the default policy (stopped: all).
/// - nova-versioned 7e114a35: launched 14:02:10 small, resized 14:15:42, deleted 14:30:08 (no
///   terminated_at) → 812 s small + 866 s large = 1678; vCPU 812 + 4 × 866 = 4276; memory
///   2 × 812 + 8 × 866 = 8552; disk 20 × 812 + 80 × 866 = 85520.
/// - out-of-order 31d87a72 (its delete first): 11:00:20 → terminated 11:30:03 = 1783 s small.
/// - the running ones are billed to the latest notification read, 2025-03-09T10:00:00Z:
///   7366c705 from 2025-03-06T10:00:30 = 3 days − 30 s = 259170 s; 98ef5e1a from
///   2025-03-08T16:00:40 = 18 h − 40 s = 64760 s (its samples and duplicates add nothing);
///   e98ab25f launched 2025-03-09T10:00:00 holds 0 s.
///
/// The other kinds, all of project db3e0c6d… on 2025-03-07 but the images (5d3696b4…,
/// 2025-03-05), each hour settled on its own and rounded once to 9 places (half to even):
/// - cinder volume 45b2831b: 10 GiB from its launched_at 09:00:05, extended to 25 GiB at
///   09:47:12 (the resize's time; delivered after the retype), retyped at 10:15:00 (same size,
///   another type on the same plan), deleted 10:31:40 → 10 × 2827 + 25 × 768 = 47,470 in the
///   09:00 hour + 25 × 1900 = 47,500 in the 10:00 hour = 94,970 GiB-s. The delete repeats
///   launched_at with 25 GiB: the earliest report of a launch (the create's 10 GiB) wins. The
///   redelivered create adds nothing, nor do the attach and detach (ignored: nothing to bill).
/// - cinder snapshot 471086fc: 10 GiB from its created_at 09:10:44 to the delete at 10:05:30
///   → 10 × (2956 + 330) = 32,860 GiB-s.
/// - neutron floating IP 71d62fbd: created 09:02:10 (no created_at: the notification's time),
///   associated 09:06:02, disassociated 10:44:00, deleted 10:50:20 (a payload naming only its
///   id); billed while allocated → 3470 + 3020 = 6490 s.
/// - glance image 0faffc1c, 1,183,514,624 bytes, private: from its upload 10:41:17 (the activate
///   at 10:41:18 changes nothing) to its deleted_at 12:06:52 → 1123, 3600 and 412 s, each hour
///   bytes × s / 2^30: 1237.80865478515625 → 1237.808654785, 3968.0419921875 → 3968.041992188,
///   454.120361328125 → 454.120361328; 5659.971008301 GiB-s. The public image 4af8e038 (and the
///   cirros one in ignored/) is billed to nobody: no account, no subscription.
/// - ceilometer network.outgoing.bytes on delta-1's interface tapc4242d90-8a: readings 48,213,577
///   (09:05, the baseline), 611,046,213, 2,406,855,904 (09:55), then 37,550,871 (10:05, the
///   counter restarted from zero: counted whole) and 1,204,662,019 (10:25) → 2,358,642,327 bytes
///   in the 09:00 hour = 2.19665684457… → 2.196656845 GiB, and 1,204,662,019 in the 10:00 hour
///   = 1.12192893307… → 1.121928933 GiB: 3.318585778 GiB. network.incoming.bytes is not billed
///   by default. The interface is subscribed from its first reading and, having no end, stays
///   active.
/// - Costs, at the catalog's per-second prices: instance 98ef5e1a (standard plan) used 64,760
///   instance-s, 64,760 vCPU-s, 129,520 GiB-s of memory and 1,295,200 GiB-s of disk:
///   0.06476 + 0.6476 + 0.25904 + 0.038856 = 1.010256 → 1.01 USD; the interface's 3.318585778
///   GiB of egress is four whole GiB blocks × 0.09 = 0.36 USD.
#[test]
fn the_fixtures_replay_to_the_expected_report() {
    let out = run_cli(&["replay", "--report", "json", "fixtures/"]);
    let expected: Value =
        serde_json::from_str(include_str!("../expected/fixtures-report.json")).expect("expected report is JSON");
    assert_eq!(report(&out.stdout), expected);
    // fixtures/malformed holds invalid messages on purpose.
    assert_eq!(out.status.code(), Some(3), "stderr: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_report_has_exactly_the_documented_shape() {
    let out = run_cli(&["replay", "--report", "json", "fixtures/nova-legacy"]);
    let report = report(&out.stdout);
    // serde_json's map is sorted, so the keys come back in name order.
    let keys: Vec<&str> = report.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "accounts",
            "costs",
            "failed",
            "ignored",
            "invalid",
            "messages",
            "processed",
            "settlement",
            "subscriptions",
            "usage"
        ]
    );
    let cost = report["costs"][0].as_object().unwrap();
    let keys: Vec<&str> = cost.keys().map(String::as_str).collect();
    assert_eq!(keys, ["currency", "period_end", "period_start", "project_id", "resources", "total", "units"]);
    let item: Vec<&str> = cost["resources"][0].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(item, ["amount", "plan", "resource_id", "resource_type"]);
    assert_eq!(cost["currency"], "USD");
    assert!(cost["total"].is_string(), "money is decimal text: {}", cost["total"]);
    let settlement: Vec<&str> = report["settlement"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(settlement, ["as_of", "audit_mismatches", "corrections", "failures", "periods_posted", "shortfalls"]);
    let sub = report["subscriptions"][0].as_object().unwrap();
    let keys: Vec<&str> = sub.keys().map(String::as_str).collect();
    assert_eq!(keys, ["end", "instance_id", "plan", "project_id", "start", "state"]);
    let account: Vec<&str> = report["accounts"][0].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(account, ["project_id", "state"]);
    let usage: Vec<&str> = report["usage"][0].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(usage, ["amount", "instance_id", "resource_id", "resource_type", "unit"]);
    assert!(report["usage"][0]["amount"].is_number());
    assert_eq!(report["usage"][0]["resource_type"], "instance");
    assert_eq!(report["usage"][0]["instance_id"], report["usage"][0]["resource_id"]);
}

#[test]
fn usage_of_other_kinds_names_its_resource_and_type_and_no_instance() {
    let out = run_cli(&["replay", "--report", "json", "fixtures/cinder", "fixtures/traffic"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let report = report(&out.stdout);
    let types: Vec<&str> =
        report["usage"].as_array().unwrap().iter().map(|u| u["resource_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["volume", "snapshot", "network_interface"]);
    for usage in report["usage"].as_array().unwrap() {
        let keys: Vec<&str> = usage.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["amount", "resource_id", "resource_type", "unit"], "{usage}");
    }
}

#[test]
fn a_clean_replay_exits_zero_and_prints_the_summary_tables() {
    let out = run_cli(&["replay", "fixtures/nova-legacy", "fixtures/out-of-order"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for heading in ["Accounts (", "Subscriptions (", "Usage (", "Costs at the catalog's prices", "Messages: "] {
        assert!(text.contains(heading), "{heading} missing from:\n{text}");
    }
}

#[test]
fn the_tables_name_each_resources_kind_instances_first() {
    let out = run_cli(&["replay", "fixtures/neutron", "fixtures/glance", "fixtures/nova-legacy"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let usage = &text[text.find("Usage (").unwrap()..text.find("Costs at the catalog's prices").unwrap()];
    let kinds: Vec<&str> = usage.lines().skip(2).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(kinds, ["instance", "instance", "instance", "instance", "floating_ip", "image"], "{usage}");
    assert!(
        usage.contains("  floating_ip 71d62fbd-762f-ab33-059c-98a110d4e2c4 openstack-floating-ip-seconds 6490"),
        "{usage}"
    );
    let subscriptions = &text[text.find("Subscriptions (").unwrap()..text.find("Usage (").unwrap()];
    assert!(subscriptions.lines().nth(1).unwrap().trim_start().starts_with("kind"), "{subscriptions}");
}

#[test]
fn replaying_the_fixtures_twice_into_one_ledger_leaves_every_total_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    let first = report(&run_cli(&["replay", "--report", "json", "--ledger", arg(&ledger), "fixtures/"]).stdout);
    let second = report(&run_cli(&["replay", "--report", "json", "--ledger", arg(&ledger), "fixtures/"]).stdout);
    assert_eq!(billing_part(&first), billing_part(&second));
    assert_eq!(first["messages"], second["messages"]);
    // And the stored ledger, shown without replaying anything, is the same again.
    let stored = run_cli(&["replay", "--report", "json", "--ledger", arg(&ledger)]);
    assert_eq!(stored.status.code(), Some(0));
    let stored = report(&stored.stdout);
    assert_eq!(billing_part(&stored), billing_part(&first));
    assert_eq!(stored["messages"], 0);
}

#[test]
fn a_malformed_file_is_reported_by_name_and_line_and_the_rest_still_replays() {
    let out = run_cli(&["replay", "--report", "json", "fixtures/malformed/not-a-delivery.jsonl"]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("fixtures/malformed/not-a-delivery.jsonl:2: invalid: not a captured delivery"), "{stderr}");
    assert!(stderr.contains("fixtures/malformed/not-a-delivery.jsonl:3: invalid"), "{stderr}");
    let report = report(&out.stdout);
    assert_eq!(report["processed"], 1, "the good first line is still replayed");
    assert_eq!(report["invalid"], 2);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn every_malformed_body_is_invalid_with_a_reason_naming_what_is_wrong() {
    let out = run_cli(&["replay", "--report", "json", "fixtures/malformed/bad-bodies.jsonl"]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    for reason in [
        ":1: invalid: body is not valid",
        ":2: invalid: oslo.message is not valid",
        ":3: invalid: missing event_type",
        ":4: invalid: payload of compute.instance.create.end is not a JSON object",
        ":5: invalid: payload of compute.instance.create.end is not valid",
        ":6: invalid: payload.launched_at",
        ":7: invalid: missing payload.instance_id",
        ":8: invalid: oslo.version \"3.0\" is not supported",
    ] {
        assert!(stderr.contains(reason), "{reason:?} missing from:\n{stderr}");
    }
    assert_eq!(report(&out.stdout)["invalid"], 8);
}

#[test]
fn replay_without_paths_or_ledger_explains_what_to_give() {
    let out = run_cli(&["replay"]);
    assert_eq!(out.status.code(), Some(1), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("give fixture PATHS, or --ledger FILE"));
}

#[test]
fn a_missing_path_is_a_usage_error_naming_it() {
    let out = run_cli(&["replay", "fixtures/no-such-folder"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("fixtures/no-such-folder"));
}

#[test]
fn an_oversized_or_binary_body_is_invalid_and_named_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.json");
    let mut body =
        String::from(r#"{"message_id":"m","event_type":"metering","timestamp":"2025-01-01 00:00:00","payload":["#);
    body.push_str(&"0,".repeat(1024 * 1024));
    body.push_str("0]}");
    std::fs::write(&huge, body).unwrap();
    let binary = dir.path().join("binary.json");
    std::fs::write(&binary, b"\xff\xfe\x00garbage").unwrap();
    let out = run_cli(&["replay", "--report", "json", arg(&huge), arg(&binary)]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("huge.json: invalid: body is 2097242 bytes, over the limit of 1048576 bytes"), "{stderr}");
    assert!(stderr.contains("binary.json: invalid: body is not valid"), "{stderr}");
    assert_eq!(report(&out.stdout)["invalid"], 2);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn a_file_that_is_not_a_ledger_is_refused_with_its_name_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("notes.json");
    std::fs::write(&ledger, "{\"my\": \"notes\"}").unwrap();
    let out = run_cli(&["replay", "--ledger", arg(&ledger), "fixtures/nova-legacy"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("notes.json is not a concertim-billing ledger or state store"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "{\"my\": \"notes\"}");
}

#[test]
fn a_config_file_maps_flavors_to_plans_and_rejects_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("billing.toml");
    let text = concertim_billing::config::DEFAULT_TOML
        .replace("[billing.plans]\n", "[billing.plans]\n\"m1.large\" = \"openstack-large-monthly\"\n");
    std::fs::write(&config, text).unwrap();
    let out = run_cli(&["replay", "--report", "json", "--config", arg(&config), "fixtures/nova-versioned"]);
    assert_eq!(report(&out.stdout)["subscriptions"][0]["plan"], "openstack-large-monthly");

    std::fs::write(&config, "[billing]\ndefault_plan = \"p\"\ndefault_plann = \"q\"\n").unwrap();
    let out = run_cli(&["replay", "--config", arg(&config), "fixtures/nova-versioned"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("default_plann"));
}

/// `replay fixtures/nova-legacy` with KillBill configured through the environment.
fn replay_with_killbill(kb: concertim_billing::config::KillBillSettings, apply: bool) -> std::process::Output {
    let mut command = crate::support::binary();
    command
        .current_dir(crate::support::root())
        .arg("replay")
        .args(apply.then_some("--apply"))
        .arg("fixtures/nova-legacy");
    crate::support::killbill_env(&mut command, &kb).output().unwrap()
}

#[tokio::test]
async fn replay_writes_to_the_configured_billing_application_only_with_apply() {
    let fake = crate::support::killbill::FakeKillBill::start().await;
    // Before: a config naming KillBill made `replay` bill into it.
    let kb = fake.settings();
    let dry = tokio::task::spawn_blocking(move || replay_with_killbill(kb, false)).await.unwrap();
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert_eq!(fake.requests(), 0, "a replay without --apply wrote to KillBill");
    assert!(String::from_utf8_lossy(&dry.stderr).contains("--apply sends it there"));
    assert!(String::from_utf8_lossy(&dry.stdout).contains("Usage ("), "the ledger's tables are shown");
    let kb = fake.settings();
    let applied = tokio::task::spawn_blocking(move || replay_with_killbill(kb, true)).await.unwrap();
    let stderr = String::from_utf8_lossy(&applied.stderr);
    assert!(stderr.contains("applying to KillBill 0.24 at http://127.0.0.1:"), "{stderr}");
    assert!(fake.usage_rows() > 0);
}

#[test]
fn negative_or_absurd_volumes_are_invalid_with_their_reason_and_never_crash_the_ledger() {
    // Two samples of 7e27 used to overflow the ledger's sum and panic replay (exit 101), and a
    // negative volume was billed as a credit.
    let line = std::fs::read_to_string(crate::support::fixtures("nova-legacy/lifecycle.jsonl"))
        .unwrap()
        .lines()
        .find(|l| l.contains("\"exchange\":\"ceilometer\""))
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostile.jsonl");
    // The fixture's samples are gauges; made deltas of a metered vcpus meter, they are usage.
    let line = line.replace("\\\"counter_type\\\": \\\"gauge\\\"", "\\\"counter_type\\\": \\\"delta\\\"");
    let huge = line.replace("\\\"counter_volume\\\": 1,", "\\\"counter_volume\\\": 7e27,");
    let negative =
        line.replace("\\\"counter_volume\\\": 1,", "\\\"counter_volume\\\": -5,").replace("b4f5d873", "c4f5d873");
    assert!(huge != line && negative != line, "the fixture's vcpus volume is 1");
    std::fs::write(&file, format!("{huge}\n{}\n{negative}\n", huge.replace("b4f5d873", "d4f5d873"))).unwrap();
    let ledger = dir.path().join("ledger.db");
    let config = dir.path().join("metered.toml");
    let metered = "[billing.meters.vcpus]\nunit = \"openstack-vcpu-samples\"\nfactor = \"1\"\ncounter = \"delta\"\n";
    std::fs::write(&config, concertim_billing::config::DEFAULT_TOML.replace("[billing.meters]\n", metered)).unwrap();
    let out = run_cli(&["replay", "--config", arg(&config), "--ledger", arg(&ledger), arg(&file)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.matches("billing.max_record_amount").count(), 2, "{stderr}");
    assert!(stderr.contains("never billed as a credit"), "{stderr}");
    // The ledger is intact and readable again.
    assert_eq!(run_cli(&["replay", "--ledger", arg(&ledger)]).status.code(), Some(0));
}

// Two workers: the fake KillBill answers while the test waits for the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accounts_says_which_accounts_killbill_would_use_adopt_or_create_and_writes_nothing() {
    let server = crate::support::killbill_server::KillBillServer::start().await;
    let project = "e89cb74df0069d478e26645ca53ab73f";
    let python = server.python_account(project, "project_cloud_id").await;
    let mut command = crate::support::binary();
    crate::support::killbill_env(&mut command, &server.settings());
    let out = command
        .args(["replay", "--check-accounts", "fixtures/nova-legacy", "fixtures/cinder"])
        .current_dir(crate::support::root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let check = stdout.split("KillBill accounts at").nth(1).unwrap_or_else(|| panic!("no check: {stdout}"));
    let line = |p: &str| check.lines().find(|l| l.trim_start().starts_with(p)).map(str::to_owned);
    let adopted = line(project).unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        adopted.contains(" adopt ") && adopted.contains(&python) && adopted.contains("project_cloud_id"),
        "{adopted}"
    );
    let created = check.lines().filter(|l| l.contains(" create ")).count();
    assert!(created >= 1, "the cinder fixtures' project has no account: {stdout}");
    // Read-only: the Python account was not given this service's field, nothing was keyed.
    let fields = server.account_fields(&python).await;
    assert!(!fields.iter().any(|(name, _)| name == "openstack_project_id"), "{fields:?}");
    assert_eq!(server.account_keyed(project).await, None);
}
