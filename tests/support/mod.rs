//! Shared test helpers: the fixtures, the upstream corpus, and running the binary.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use concertim_billing::{
    billing::{ledger::Snapshot, Billing, Ledger},
    config::Settings,
    executor::{Delivery, Executor, Outcome},
    fixture::{self, FixtureDelivery},
};
use proptest::prelude::*;

/// The project root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `fixtures/` or one of its folders.
pub fn fixtures(sub: &str) -> PathBuf {
    root().join("fixtures").join(sub)
}

/// Every delivery under a fixtures folder, in replay order (lines that are not deliveries
/// left out).
pub fn deliveries(sub: &str) -> Vec<FixtureDelivery> {
    let files = fixture::collect_files(&[fixtures(sub)]).expect("fixtures are readable");
    fixture::read_all(&files).into_iter().filter_map(|(_, d)| d.ok()).collect()
}

/// The billable fixtures: every folder but the deliberately malformed one.
pub fn billable() -> Vec<FixtureDelivery> {
    ["nova-legacy", "nova-versioned", "keystone", "out-of-order", "duplicates", "ignored"]
        .into_iter()
        .flat_map(deliveries)
        .collect()
}

/// Settings where the resized flavor has a plan of its own, so that plan changes are part of
/// what the order tests compare.
/// A Ceilometer delivery made to claim its samples for `project` (a new message id too): what
/// a sample from a project that does not own the instance looks like.
pub fn claimed_by(delivery: &FixtureDelivery, project: &str) -> FixtureDelivery {
    let envelope: serde_json::Value = serde_json::from_slice(&delivery.body).unwrap();
    let mut message: serde_json::Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    message["message_id"] = format!("claimed-by-{project}").into();
    for sample in message["payload"].as_array_mut().unwrap() {
        sample["project_id"] = project.into();
    }
    let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
    FixtureDelivery { body: serde_json::to_vec(&body).unwrap(), ..delivery.clone() }
}

/// The settings of the resize tests: two flavors on two plans.
pub fn resize_settings() -> Settings {
    let text = concertim_billing::config::DEFAULT_TOML
        .replace("[billing.plans]\n", "[billing.plans]\n\"m1.large\" = \"openstack-large-monthly\"\n");
    Settings::from_toml(&text, "test").unwrap()
}

/// Runs `fixtures` in order through an executor over `billing`; returns it and the outcomes.
pub async fn run_through<B: Billing>(billing: B, fixtures: &[&FixtureDelivery]) -> (Executor<B>, Vec<Outcome>) {
    let executor = Executor::new(resize_settings(), billing);
    let mut outcomes = Vec::with_capacity(fixtures.len());
    for d in fixtures {
        outcomes.push(executor.handle(Delivery { body: &d.body, redelivered: d.redelivered }).await);
    }
    (executor, outcomes)
}

/// What the ledger holds after `fixtures`, in order.
pub async fn through_ledger(fixtures: &[&FixtureDelivery]) -> Snapshot {
    run_through(Ledger::in_memory(), fixtures).await.0.billing().snapshot()
}

/// Fails the test when any outcome is a failure.
pub fn assert_no_failures(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(!matches!(o, Outcome::Failed { .. }), "{o:?}");
    }
}

/// Every index of `0..n` once, some a second time, in a random order.
pub fn permutation_with_duplicates(n: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(any::<bool>(), n).prop_flat_map(move |dup| {
        let mut order: Vec<usize> = (0..n).collect();
        order.extend((0..n).filter(|i| dup[*i]));
        Just(order).prop_shuffle()
    })
}

/// The upstream notification corpus beside the project, or `None` with a printed notice. When
/// `CONCERTIM_BILLING_REQUIRE_SHARED` is set (as `.ci/run` does) its absence fails the test.
pub fn upstream_corpus() -> Option<PathBuf> {
    let dir = root().join("../shared/upstream-notifications");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var_os("CONCERTIM_BILLING_REQUIRE_SHARED").is_some() {
        panic!("{} is missing and CONCERTIM_BILLING_REQUIRE_SHARED is set", dir.display());
    }
    eprintln!("skipped: {} is absent (set CONCERTIM_BILLING_REQUIRE_SHARED to make this a failure)", dir.display());
    None
}

/// The test suite's own switches. They share the service's `CONCERTIM_BILLING_` prefix, under
/// which the service reads every variable as a setting and refuses unknown ones, so they are
/// never passed on to the binary.
pub const TEST_SWITCHES: [&str; 7] = [
    "CONCERTIM_BILLING_OSLO_PYTHON",
    "CONCERTIM_BILLING_KILLBILL_URL",
    "CONCERTIM_BILLING_KILLBILL",
    "CONCERTIM_BILLING_FAULTS_BROKER_RESTART",
    "CONCERTIM_BILLING_FAULTS_SEED",
    "CONCERTIM_BILLING_SOAK",
    "CONCERTIM_BILLING_FUZZ_CASES",
];

/// The `concertim-billing` binary without the caller's `CONCERTIM_BILLING_CONFIG` or the
/// suite's switches in its environment.
pub fn binary() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_concertim-billing"));
    command.env_remove("CONCERTIM_BILLING_CONFIG");
    for switch in TEST_SWITCHES {
        command.env_remove(switch);
    }
    command
}

/// Configures `command` to bill into the KillBill of `kb` through the environment, as an
/// operator would.
pub fn killbill_env<'a>(command: &'a mut Command, kb: &concertim_billing::config::KillBillSettings) -> &'a mut Command {
    command
        .env("CONCERTIM_BILLING_BILLING__BACKEND", "killbill")
        .env("CONCERTIM_BILLING_KILLBILL__URL", &kb.url)
        .env("CONCERTIM_BILLING_KILLBILL__USERNAME", &kb.username)
        .env("CONCERTIM_BILLING_KILLBILL__PASSWORD", kb.password.expose())
        .env("CONCERTIM_BILLING_KILLBILL__API_KEY", &kb.api_key)
        .env("CONCERTIM_BILLING_KILLBILL__API_SECRET", kb.api_secret.expose())
}

/// `rabbitmqctl` with `args`, its output; panics saying how to get it when it is missing.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("rabbitmqctl is needed (deploy/dev/test.sh installs RabbitMQ): {e}"));
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the `concertim-billing` binary with `args` in the project root.
pub fn run_cli(args: &[&str]) -> Output {
    binary().args(args).current_dir(root()).output().expect("the binary runs")
}

/// A path as a `&str` argument.
pub fn arg(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

pub mod bus;
pub mod concertim;
pub mod fake_server;
pub mod hostbill;
pub mod killbill;
pub mod killbill_server;
pub mod wait;
