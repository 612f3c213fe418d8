//! The fault-injection suite: the service under proxy cuts, a broker restart, nodes of a
//! three-node broker cluster stopped under it, SIGKILLs (also in the middle of a settlement),
//! KillBill outages and lost answers, Concertim down, floods of invalid messages and hostile
//! input, and two replicas settling from one PostgreSQL state store; each scenario ending with the fake KillBill's totals, and every metered sample and
//! instance period in it, compared exactly with what was computed from what was published.
//! Each scenario prints its row of `RELIABILITY.md` on stderr
//! (`cargo test --test faults -- --nocapture`).
//!
//! `CONCERTIM_BILLING_SOAK=1` runs the long variants; `CONCERTIM_BILLING_FAULTS_BROKER_RESTART=1`
//! lets the proxy scenario restart the broker (`rabbitmqctl stop_app`/`start_app`), which
//! every other user of the broker notices; `CONCERTIM_BILLING_FUZZ_CASES` sets the decoder fuzz
//! run's length.

#[path = "../support/mod.rs"]
mod support;

mod bus;
mod cluster;
mod fuzz;
mod hostile;
mod kill;
mod replicas;
mod traffic;

use std::time::{Duration, Instant};

use concertim_billing::{billing::ledger::Snapshot, bus::ack, config::Settings, store::Store};
use lapin::types::AMQPValue;

use crate::{
    support::{bus::TestBus, killbill::FakeKillBill, wait::poll},
    traffic::{Exactness, Expected},
};

/// Scenarios that use the broker hold this for reading; the broker restart holds it for
/// writing, so that nothing else in this target runs while the broker is away.
pub static BROKER_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Whether the long soak variants run.
pub fn soak() -> bool {
    std::env::var("CONCERTIM_BILLING_SOAK").is_ok_and(|v| v == "1")
}

/// One row of the reliability table.
pub struct Row {
    /// The scenario.
    pub scenario: &'static str,
    /// Messages published.
    pub messages: usize,
    /// The faults injected, in words.
    pub faults: String,
    /// Usage messages (metered samples and instance periods) lost.
    pub lost: usize,
    /// Usage messages (metered samples and instance periods) billed more than once.
    pub duplicated: usize,
    /// Messages in the dead-letter queue.
    pub dead_lettered: usize,
    /// From the end of the last fault until everything was billed and acknowledged.
    pub recovered: Duration,
}

impl Row {
    /// Prints the row as a line of the Markdown table in `RELIABILITY.md`.
    pub fn print(&self) {
        eprintln!(
            "RELIABILITY | {} | {} | {} | {} | {} | {} | {:.1} s |",
            self.scenario,
            self.messages,
            self.faults,
            self.lost,
            self.duplicated,
            self.dead_lettered,
            self.recovered.as_secs_f64()
        );
    }
}

/// A dead letter as the suite checks it.
pub struct DeadLetter {
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// `x-concertim-class`.
    pub class: String,
    /// `x-concertim-reason`.
    pub reason: String,
}

fn text_header(properties: &lapin::BasicProperties, name: &str) -> String {
    match ack::header(properties, name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => format!("{other:?}"),
    }
}

/// Takes every dead letter off the test's dead-letter queue.
pub async fn dead_letters(bus: &TestBus) -> Vec<DeadLetter> {
    bus.drain(&bus.names().dead_queue)
        .await
        .into_iter()
        .map(|m| DeadLetter {
            class: text_header(&m.delivery.properties, ack::CLASS),
            reason: text_header(&m.delivery.properties, ack::REASON),
            body: m.delivery.data,
        })
        .collect()
}

/// Settlement as the scenarios run it: a pass every second, on the clock of the generated
/// traffic (see `traffic`'s module doc).
pub fn settling(settings: &mut Settings) {
    settings.billing.time.settle_every_s = 1;
    settings.billing.time.grace_s = crate::traffic::grace_s();
}

/// Waits until KillBill holds every expected usage row, the main and retry queues are empty, the
/// dead-letter queue holds `dead` messages and the state store has recorded every settlement
/// step posted (it does so after KillBill answered, and a step whose answer timed out is
/// recorded by a later pass), then until KillBill's snapshot equals the expected one; returns
/// how long that took. On timeout it returns too: the caller's exact comparisons then say what
/// differs.
pub async fn settle(
    bus: &TestBus,
    fake: &FakeKillBill,
    store: &Store,
    expected: &Expected,
    dead: u32,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    let want = expected.snapshot();
    let names = bus.names();
    // Every 100 ms: a snapshot of a large run is not cheap.
    let settled = poll(limit, Duration::from_millis(100), || async {
        let cheap = fake.usage_rows() >= expected.rows()
            && bus.depth(&names.queue).await == 0
            && bus.depth(&names.retry_queue).await == 0
            && bus.depth(&names.dead_queue).await >= dead
            && store.counts().await.is_ok_and(|c| c.posted >= expected.steps() as i64);
        if cheap && fake.snapshot() == want {
            Ok(())
        } else {
            Err(())
        }
    });
    // A timeout is left to the caller's exact comparison, which says what differs.
    let _ = settled.await;
    start.elapsed()
}

/// Asserts KillBill holds exactly what was published: every metered sample and every instance
/// period once, under its own trackingId, with its exact amounts, and the totals, accounts and
/// subscriptions of its snapshot. Returns (lost, duplicated) usage messages, which are then 0.
pub fn assert_exact(scenario: &str, fake: &FakeKillBill, expected: &Expected) -> (usize, usize) {
    let e = expected.exactness(&fake.usage_records());
    eprintln!(
        "{scenario}: {} of {} metered samples lost, {} billed twice; {} of {} instance periods lost, {} billed twice",
        e.samples_lost,
        expected.samples(),
        e.samples_duplicated,
        e.periods_lost,
        expected.periods(),
        e.periods_duplicated
    );
    let got: Snapshot = fake.snapshot();
    let want = expected.snapshot();
    assert_same(scenario, &got, &want);
    assert_eq!(e, Exactness::default(), "{scenario}: lost, duplicated");
    assert!(fake.violations().is_empty(), "{scenario}: bodies the OpenAPI spec rejects: {:?}", fake.violations());
    (e.lost(), e.duplicated())
}

/// Asserts the state store agrees: every settlement step (each period, each subscription, each
/// cancel) posted, none left claimed, none posted beyond them (a correction would be), and no
/// period recomputed below what was posted.
pub async fn assert_settled(scenario: &str, store: &Store, expected: &Expected) {
    let counts = store.counts().await.unwrap();
    assert_eq!(
        (counts.claimed, counts.posted, counts.shortfalls),
        (0, expected.steps() as i64, 0),
        "{scenario}: claimed, posted and shortfalls in the state store"
    );
}

/// Rows only one side has, at most a few of each, in words.
fn differences<T: std::fmt::Debug>(got: &[T], want: &[T]) -> Option<String> {
    let got: std::collections::BTreeSet<String> = got.iter().map(|r| format!("{r:?}")).collect();
    let want: std::collections::BTreeSet<String> = want.iter().map(|r| format!("{r:?}")).collect();
    if got == want {
        return None;
    }
    let extra: Vec<&String> = got.difference(&want).take(5).collect();
    let missing: Vec<&String> = want.difference(&got).take(5).collect();
    Some(format!(
        "{} rows only in KillBill, {} only expected; e.g. only in KillBill: {extra:#?}; only expected: {missing:#?}",
        got.difference(&want).count(),
        want.difference(&got).count()
    ))
}

/// Fails with the differing rows when two snapshots differ in accounts, subscriptions or usage.
pub fn assert_same(scenario: &str, got: &Snapshot, want: &Snapshot) {
    let problems: Vec<String> = [
        differences(&got.accounts, &want.accounts).map(|d| format!("accounts: {d}")),
        differences(&got.subscriptions, &want.subscriptions).map(|d| format!("subscriptions: {d}")),
        differences(&got.usage, &want.usage).map(|d| format!("usage: {d}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    assert!(problems.is_empty(), "{scenario}: KillBill differs from what was published:\n{}", problems.join("\n"));
}
