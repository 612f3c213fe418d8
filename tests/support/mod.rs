//! Shared test helpers: the fixtures, the upstream corpus, and running the binary.

#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use concertim_billing::{
    billing::{ledger::Snapshot, Billing, Ledger},
    config::Settings,
    event::Timestamp,
    executor::{Delivery, Executor, Outcome},
    fixture::{self, FixtureDelivery},
    settle::{Horizon, Pass},
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

/// The billable fixtures of instances and projects: every folder but the deliberately
/// malformed one, Heat's (nothing to bill) and those of the other resource kinds (cinder,
/// neutron, glance, traffic), which the replay's expected report covers.
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

/// The settings of the resize tests with the bus tests' delta test meter ([`bus::TEST_METER`])
/// billed too: what a test about how one message's usage is recorded runs with.
pub fn metered_settings() -> Settings {
    let mut settings = resize_settings();
    settings.billing.meters.insert(bus::TEST_METER.into(), bus::test_meter());
    settings
}

/// Runs `fixtures` in order through an executor over `billing`; returns it and the outcomes.
pub async fn run_through<B: Billing>(billing: B, fixtures: &[&FixtureDelivery]) -> (Executor<B>, Vec<Outcome>) {
    run_with(resize_settings(), billing, fixtures).await
}

/// [`run_through`] under `settings`.
pub async fn run_with<B: Billing>(
    settings: Settings,
    billing: B,
    fixtures: &[&FixtureDelivery],
) -> (Executor<B>, Vec<Outcome>) {
    let executor = Executor::new(settings, billing);
    let mut outcomes = Vec::with_capacity(fixtures.len());
    for d in fixtures {
        outcomes.push(executor.handle(Delivery { body: &d.body, redelivered: d.redelivered }).await);
    }
    (executor, outcomes)
}

/// Runs `fixtures` in order under `settings` as `run` does, its clock the notifications' times:
/// a settlement pass as at the latest notification time so far before each message and after
/// the last (a period is settled once its end, or the instance's end, plus
/// `billing.time.grace_s` has passed; a running instance's current period waits). Returns the
/// executor and the outcomes; fails the test on a settlement step that failed.
pub async fn run_settling<B: Billing>(
    settings: Settings,
    billing: B,
    fixtures: &[&FixtureDelivery],
) -> (Executor<B>, Vec<Outcome>) {
    let executor = Executor::new(settings, billing);
    let settler = executor.settler().await.unwrap();
    let pass = |now: Timestamp| {
        let settler = &settler;
        async move {
            let pass = settler.pass(Horizon::Now(now.unix())).await.unwrap();
            assert!(pass.failures.is_empty(), "settlement steps failed: {:?}", pass.failures);
        }
    };
    let mut outcomes = Vec::with_capacity(fixtures.len());
    let mut clock: Option<Timestamp> = None;
    for d in fixtures {
        if let Ok(n) = executor.decode(&d.body) {
            let now = clock.map_or(n.meta.timestamp, |t| t.max(n.meta.timestamp));
            clock = Some(now);
            pass(now).await;
        }
        outcomes.push(executor.handle(Delivery { body: &d.body, redelivered: d.redelivered }).await);
    }
    pass(clock.expect("some fixture decodes")).await;
    (executor, outcomes)
}

/// The usage of the instances whose subscription has ended, in `snapshot`: what is settled
/// for good.
pub fn ended_usage(snapshot: &Snapshot) -> Vec<concertim_billing::billing::ledger::UsageRow> {
    let ended: Vec<_> = snapshot.subscriptions.iter().filter(|s| s.end.is_some()).map(|s| &s.instance_id).collect();
    snapshot.usage.iter().filter(|u| ended.contains(&&u.instance_id)).cloned().collect()
}

/// The latest notification time among `fixtures` (those that decode): where `replay` settles
/// the running instances to.
pub fn latest(fixtures: &[&FixtureDelivery]) -> Timestamp {
    let executor = Executor::new(resize_settings(), Ledger::in_memory());
    fixtures
        .iter()
        .filter_map(|d| executor.decode(&d.body).ok())
        .map(|n| n.meta.timestamp)
        .max()
        .expect("some fixture decodes")
}

/// Settles every timeline `executor` built, as of `as_of`, as `replay` does (ended instances to
/// their end, running ones to `as_of`); fails the test on a step that failed.
pub async fn settle<B: Billing>(executor: &Executor<B>, as_of: Timestamp) -> Pass {
    let pass = executor.settler().await.unwrap().pass(Horizon::AsOf(as_of.unix())).await.unwrap();
    assert!(pass.failures.is_empty(), "settlement steps failed: {:?}", pass.failures);
    pass
}

/// What the ledger holds after `fixtures`, in order, settled as of the latest of them.
pub async fn settled_ledger(fixtures: &[&FixtureDelivery]) -> Snapshot {
    let (executor, outcomes) = run_through(Ledger::in_memory(), fixtures).await;
    assert_no_failures(&outcomes);
    settle(&executor, latest(fixtures)).await;
    executor.billing().snapshot()
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

/// Makes a CA and a certificate it signs for 127.0.0.1 in `dir`; returns (ca, cert, key).
pub fn certificates(dir: &std::path::Path) -> (String, String, String) {
    let file = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let openssl = |args: &[&str]| {
        let out =
            std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[&["req", "-x509"], &ec[..], &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca"]]
            .concat(),
    );
    openssl(
        &[&["req", "-new"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]]
            .concat(),
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (file("ca.pem"), file("server.pem"), file("server.key"))
}

pub mod bus;
pub mod concertim;
pub mod fake_server;
pub mod hostbill;
pub mod keystone;
pub mod killbill;
pub mod killbill_server;
pub mod tls;
pub mod wait;
