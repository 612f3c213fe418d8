//! Generated traffic and what it must bill: projects, instance lives (created, some resized, some
//! deleted) and metered usage, in the legacy Nova / Keystone / Ceilometer forms of the fixtures
//! with fresh ids; and what they bill, computed from what was generated (not by running the
//! service's own code): every metered sample once, and every instance's seconds × quantities per
//! aligned hour.
//!
//! # The settlement clock
//!
//! The lives are dated 2025, like the fixtures, and settlement compares periods with the wall
//! clock. With `grace_s = 0` a pass that runs between an instance's `create.end` and its
//! `delete.end` (a retry, a redelivery or a restart keeps them apart for seconds) bills the
//! running instance's every hour up to today, and the `delete.end` can then only record a
//! shortfall. In production the grace (900 s) covers such delays; here [`grace_s`] is chosen so
//! that the service's settlement clock reads [`SETTLED_AT`] when the test starts, and runs on from
//! there:
//! - every life ends, if it ends, in `[THE_HOUR, SETTLED_AT)`, and every resize falls there too,
//!   so every period of an ended instance is due at once;
//! - an instance not (yet) known to have ended is due up to [`THE_HOUR`] only, and the hours
//!   before it are the same whether or not its resize or its end has been recorded; its hour
//!   [`THE_HOUR`] becomes due `3600 - ENDS_WITHIN` seconds (50 minutes) after the test started,
//!   far beyond any scenario's limits.
//!
//! What arrival order can still change is the first launch a settlement sees: a resize or a
//! delete recorded before its instance's `create.end` would start the subscription at the resize.
//! The resizes and the deletes of resized instances are therefore published only once the state
//! store holds what came before them ([`Later::publish`]), as Nova sends them minutes apart.

use std::collections::{BTreeMap, BTreeSet};

use concertim_billing::{
    billing::ledger::{AccountRow, Snapshot, SubscriptionRow, UsageRow},
    event::{InstanceId, PlanName, ProjectId, ResourceKind, Timestamp, Unit},
    store::Store,
};
use lapin::BasicProperties;
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};

use crate::support::{
    bus::{TestBus, TEST_METER, TEST_UNIT},
    deliveries,
    wait::eventually,
};

/// The plan every flavor bills on with the embedded settings (no `[billing.plans]`).
const PLAN: &str = "openstack-standard-monthly";

/// The instance-time units, in seconds (the catalog's names).
const INSTANCE_S: &str = "openstack-instance-seconds";
const VCPU_S: &str = "openstack-vcpu-seconds";
const MEMORY_GIB_S: &str = "openstack-memory-gib-seconds";
const DISK_GIB_S: &str = "openstack-disk-gib-seconds";

/// A billing period: an aligned UTC hour.
const HOUR: i64 = 3_600;

/// 2025-03-03T12:00:00Z: the hour in which every resize and every end falls.
pub const THE_HOUR: i64 = 1_741_003_200;

/// Every resize and every end is in `[THE_HOUR, THE_HOUR + ENDS_WITHIN)`.
const ENDS_WITHIN: i64 = 600;

/// What the service's settlement clock reads when a scenario starts (see the module doc).
pub const SETTLED_AT: i64 = THE_HOUR + ENDS_WITHIN;

/// `billing.time.grace_s` that sets the service's settlement clock to [`SETTLED_AT`] now.
pub fn grace_s() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    now - SETTLED_AT as u64
}

/// A flavor: name, vCPUs, RAM in MiB, root and ephemeral disk in GiB. 1000 MiB is not a whole
/// number of GiB; a volume-backed flavor has no disk, so that unit is left out of its records.
struct Flavor(&'static str, u64, u64, u64, u64);

const FLAVORS: [Flavor; 6] = [
    Flavor("m1.tiny", 1, 512, 1, 0),
    Flavor("m1.small", 1, 2048, 20, 0),
    Flavor("m1.medium", 2, 4096, 40, 0),
    Flavor("m1.large", 4, 8192, 80, 0),
    Flavor("c1.odd", 3, 1000, 10, 5),
    Flavor("v1.volume", 2, 3072, 0, 0),
];

/// A time as Nova reports it: whole seconds and the microseconds the service drops.
#[derive(Clone, Copy)]
struct At(i64, u32);

impl At {
    fn date_time(self) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(self.0).unwrap() + time::Duration::microseconds(self.1.into())
    }

    /// `2025-03-03T09:00:41.123456`, as in a Nova payload.
    fn nova(self) -> String {
        let t = self.date_time();
        let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]");
        t.format(&f).unwrap()
    }

    /// `2025-03-03 09:00:41.123456`, as in an oslo message's `timestamp`.
    fn oslo(self) -> String {
        let t = self.date_time();
        let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]");
        t.format(&f).unwrap()
    }
}

/// `2025-03-03T12:00:00Z`: how a trackingId names a whole second.
fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A small deterministic generator (splitmix64): a run is reproduced from its seed.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn micros(&mut self) -> u32 {
        self.below(1_000_000) as u32
    }
}

/// The run's seed: `CONCERTIM_BILLING_FAULTS_SEED`, or the clock (printed, so a failing run can
/// be repeated).
pub fn seed(scenario: &str) -> u64 {
    let seed = std::env::var("CONCERTIM_BILLING_FAULTS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{scenario}: seed {seed} (CONCERTIM_BILLING_FAULTS_SEED={seed} repeats it)");
    seed
}

/// One message to publish.
#[derive(Clone)]
pub struct Message {
    /// The upstream exchange (without the test's prefix).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
}

/// Publishes every message, persistent, 500 at a time before waiting for the broker's
/// confirms (one confirm at a time would make publishing the slowest part of a run).
pub async fn publish_all(bus: &TestBus, messages: &[Message]) {
    for batch in messages.chunks(500) {
        let mut confirms = Vec::with_capacity(batch.len());
        for m in batch {
            let properties =
                BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
            let confirm = bus
                .channel()
                .basic_publish(
                    bus.exchange(&m.exchange).as_str().into(),
                    m.routing_key.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    &m.body,
                    properties,
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.unwrap().is_ack(), "the broker confirmed the message");
        }
    }
}

/// How the usage rows KillBill holds compare with what was published, by trackingId: a
/// metered sample (`s1:…`) or an instance's period (`tb1:…`) is lost when KillBill holds less
/// than its amount in one of its units, duplicated when it holds more, holds a unit twice, or
/// holds rows under a trackingId nobody expects (a period posted again under a correction's id).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Exactness {
    /// Metered samples lost.
    pub samples_lost: usize,
    /// Metered samples billed more than once.
    pub samples_duplicated: usize,
    /// Instance periods lost.
    pub periods_lost: usize,
    /// Instance periods billed more than once.
    pub periods_duplicated: usize,
}

impl Exactness {
    /// Usage messages (samples and periods) lost.
    pub fn lost(&self) -> usize {
        self.samples_lost + self.periods_lost
    }

    /// Usage messages (samples and periods) billed more than once.
    pub fn duplicated(&self) -> usize {
        self.samples_duplicated + self.periods_duplicated
    }
}

/// What KillBill holds of one usage message: per unit, the amount and the rows it is in.
type HeldUnits<'a> = BTreeMap<&'a str, (Decimal, usize)>;

/// What the generated valid traffic must bill, exactly.
#[derive(Default)]
pub struct Expected {
    accounts: BTreeSet<String>,
    /// instance → (project, start, end).
    subscriptions: BTreeMap<String, (String, i64, Option<i64>)>,
    /// (instance, trackingId) → amount per unit.
    records: BTreeMap<(String, String), BTreeMap<&'static str, Decimal>>,
}

impl Expected {
    /// The totals as the fake KillBill's snapshot reports them: accounts, subscriptions, and
    /// the usage per instance and unit in the catalog's units. The test meter's unit is not a
    /// catalog unit, so KillBill's view leaves it out; [`Expected::exactness`] checks it.
    pub fn snapshot(&self) -> Snapshot {
        let accounts = self
            .accounts
            .iter()
            .map(|p| AccountRow { project_id: ProjectId::parse(p.clone()).unwrap(), state: "open" })
            .collect();
        let subscriptions = self
            .subscriptions
            .iter()
            .map(|(instance, (project, start, end))| SubscriptionRow {
                instance_id: InstanceId::parse(instance.clone()).unwrap(),
                resource_type: ResourceKind::Instance,
                project_id: ProjectId::parse(project.clone()).unwrap(),
                plan: PlanName::parse(PLAN).unwrap(),
                state: if end.is_some() { "cancelled" } else { "active" },
                start: Timestamp::from_unix(*start).unwrap(),
                end: end.map(|e| Timestamp::from_unix(e).unwrap()),
            })
            .collect();
        let mut totals: BTreeMap<(&str, &str), Decimal> = BTreeMap::new();
        for ((instance, _), units) in &self.records {
            for (unit, amount) in units.iter().filter(|(unit, _)| **unit != TEST_UNIT) {
                *totals.entry((instance.as_str(), unit)).or_default() += amount;
            }
        }
        let usage = totals
            .into_iter()
            .map(|((instance, unit), amount)| UsageRow {
                instance_id: InstanceId::parse(instance).unwrap(),
                unit: Unit::parse(unit).unwrap(),
                amount: amount.normalize(),
            })
            .collect();
        Snapshot { accounts, subscriptions, usage, late_records: 0 }
    }

    /// Usage rows expected in KillBill: one per unit of each sample and each period.
    pub fn rows(&self) -> usize {
        self.records.values().map(BTreeMap::len).sum()
    }

    /// Instance periods expected (trackingIds `tb1:…`).
    pub fn periods(&self) -> usize {
        self.records.keys().filter(|(_, id)| id.starts_with("tb1:")).count()
    }

    /// Metered samples expected (trackingIds `s1:…`).
    pub fn samples(&self) -> usize {
        self.records.keys().filter(|(_, id)| id.starts_with("s1:")).count()
    }

    /// The settlement steps the state store must hold as posted: each period, each
    /// instance's subscription and each ended instance's cancel (no plan changes: one plan).
    pub fn steps(&self) -> usize {
        self.periods() + self.subscriptions.len() + self.subscriptions.values().filter(|s| s.2.is_some()).count()
    }

    /// The instances.
    pub fn instances(&self) -> impl Iterator<Item = &str> {
        self.subscriptions.keys().map(String::as_str)
    }

    /// Compares the usage rows KillBill holds, (subscription key, unit, trackingId, amount),
    /// with what was published.
    pub fn exactness(&self, rows: &[(String, String, String, Decimal)]) -> Exactness {
        let mut held: BTreeMap<(&str, &str), HeldUnits<'_>> = BTreeMap::new();
        for (instance, unit, tracking, amount) in rows {
            let unit =
                held.entry((instance.as_str(), tracking.as_str())).or_default().entry(unit.as_str()).or_default();
            unit.0 += amount;
            unit.1 += 1;
        }
        let mut out = Exactness::default();
        let sample = |id: &str| id.starts_with("s1:");
        for ((instance, id), units) in &self.records {
            let got = held.get(&(instance.as_str(), id.as_str()));
            let short = units.iter().any(|(unit, want)| got.and_then(|g| g.get(unit)).is_none_or(|(a, _)| a < want));
            if short {
                *if sample(id) { &mut out.samples_lost } else { &mut out.periods_lost } += 1;
            }
        }
        for ((instance, id), got) in &held {
            let want = self.records.get(&((*instance).to_owned(), (*id).to_owned()));
            let over = got.iter().any(|(unit, (amount, n))| {
                *n > 1 || want.and_then(|w| w.get(unit)).is_none_or(|expected| amount > expected)
            });
            if over {
                *if sample(id) { &mut out.samples_duplicated } else { &mut out.periods_duplicated } += 1;
            }
        }
        out
    }

    /// Adds what one life bills: its account, its subscription, and its periods. Each period
    /// is the overlap in seconds of the hour (cut at the end) with each flavor's stretch, times
    /// the flavor's quantities; RAM in GiB is MiB-seconds / 1024, rounded once per record to 9
    /// places (half to even; the flavors here never reach a tenth place).
    fn add_life(&mut self, life: &Life) {
        self.accounts.insert(life.project.clone());
        let (start, end) = (life.launched.0, life.end.map(|e| e.0));
        self.subscriptions.insert(life.instance.clone(), (life.project.clone(), start, end));
        // Flavor stretches: [launch, resize or end), [resize, end).
        let mut stretches = vec![(start, life.resize.map(|(r, _)| r.0).or(end), life.flavor)];
        if let Some((r, f)) = life.resize {
            stretches.push((r.0, end, f));
        }
        // An ended life is billed to its end; one still running up to THE_HOUR (module doc).
        let until = end.unwrap_or(THE_HOUR);
        let mut p = start - start.rem_euclid(HOUR);
        while p < until {
            let (from, to) = (p, (p + HOUR).min(until));
            let mut held = [0i128; 4];
            for (a, b, f) in &stretches {
                let s = i128::from((b.unwrap_or(i64::MAX).min(to) - (*a).max(from)).max(0));
                held[0] += s;
                held[1] += s * i128::from(FLAVORS[*f].1);
                held[2] += s * i128::from(FLAVORS[*f].2);
                held[3] += s * i128::from(FLAVORS[*f].3 + FLAVORS[*f].4);
            }
            let memory = (Decimal::from_i128_with_scale(held[2], 0) / Decimal::from(1024))
                .round_dp_with_strategy(9, RoundingStrategy::MidpointNearestEven);
            let units: BTreeMap<&'static str, Decimal> = [
                (INSTANCE_S, Decimal::from_i128_with_scale(held[0], 0)),
                (VCPU_S, Decimal::from_i128_with_scale(held[1], 0)),
                (MEMORY_GIB_S, memory),
                (DISK_GIB_S, Decimal::from_i128_with_scale(held[3], 0)),
            ]
            .into_iter()
            .filter(|(_, amount)| !amount.is_zero())
            .collect();
            self.records.insert((life.instance.clone(), format!("tb1:{}", rfc3339(p))), units);
            p += HOUR;
        }
    }

    fn add_sample(&mut self, instance: &str, at: i64, volume: u64) {
        let id = format!("s1:{TEST_METER}:{}", rfc3339(at));
        let previous = self.records.insert((instance.to_owned(), id), BTreeMap::from([(TEST_UNIT, volume.into())]));
        assert!(previous.is_none(), "each sample of an instance has a time of its own");
    }
}

/// One instance's life.
struct Life {
    project: String,
    instance: String,
    launched: At,
    /// Index into [`FLAVORS`].
    flavor: usize,
    resize: Option<(At, usize)>,
    end: Option<At>,
}

/// The messages that must wait until the state store holds what came before them (module doc).
#[derive(Default)]
pub struct Later {
    /// The resizes, each after its instance's launch: (instance, launched_at before, message).
    resizes: Vec<(String, i64, Message)>,
    /// The deletes of resized instances, each after its resize.
    deletes: Vec<(String, i64, Message)>,
}

impl Later {
    /// Messages.
    pub fn len(&self) -> usize {
        self.resizes.len() + self.deletes.len()
    }

    /// Every message, in the order they are published.
    pub fn messages(&self) -> Vec<Message> {
        self.resizes.iter().chain(&self.deletes).map(|(_, _, m)| m.clone()).collect()
    }

    /// Publishes the resizes once `store` holds every resized instance's first launch, and the
    /// deletes once it holds every resize.
    pub async fn publish(&self, bus: &TestBus, store: &Store) {
        for (what, step) in [("their launch", &self.resizes), ("their resize", &self.deletes)] {
            eventually(&format!("the state store to hold the resized instances' {what}"), LATER_LIMIT, || async {
                for (instance, launch, _) in step {
                    if !launches(store, instance).await.contains(launch) {
                        return None;
                    }
                }
                Some(())
            })
            .await;
            let messages: Vec<Message> = step.iter().map(|(_, _, m)| m.clone()).collect();
            publish_all(bus, &messages).await;
        }
    }
}

/// How long [`Later::publish`] waits for each step (a KillBill outage holds the first back).
const LATER_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// The launch times the state store holds for an instance (none while it is unknown).
pub async fn launches(store: &Store, instance: &str) -> BTreeSet<i64> {
    let Ok(Some(resource)) = store.resource(instance).await else { return BTreeSet::new() };
    resource
        .facts
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter(|f| f["fact"] == "launch")
        .filter_map(|f| f["at"].as_i64())
        .collect()
}

/// Templates from the legacy Nova lifecycle fixture: the inner oslo message of each event type.
struct Templates {
    project_created: Value,
    create_end: Value,
    resize_end: Value,
    delete_end: Value,
    /// Ceilometer's gauges, as the fixture has them (the invalid messages break them).
    metering: Value,
    /// A Ceilometer message with one sample of the test meter (delta).
    usage: Value,
}

fn templates() -> Templates {
    let mut found: BTreeMap<String, Value> = BTreeMap::new();
    for d in deliveries("nova-legacy") {
        let envelope: Value = serde_json::from_slice(&d.body).unwrap();
        let message: Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
        let event_type = message["event_type"].as_str().unwrap().to_owned();
        found.entry(event_type).or_insert(message);
    }
    let mut metering = found.remove("metering").unwrap();
    let samples: Vec<Value> = metering["payload"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["counter_name"] == "vcpus" || s["counter_name"] == "memory")
        .cloned()
        .collect();
    metering["payload"] = Value::Array(samples);
    let mut usage = metering.clone();
    let mut sample = usage["payload"][0].clone();
    sample["counter_name"] = json!(TEST_METER);
    sample["counter_type"] = json!("delta");
    sample["counter_unit"] = json!("unit");
    usage["payload"] = json!([sample]);
    Templates {
        project_created: found.remove("identity.project.created").unwrap(),
        create_end: found.remove("compute.instance.create.end").unwrap(),
        resize_end: found.remove("compute.instance.finish_resize.end").unwrap(),
        delete_end: found.remove("compute.instance.delete.end").unwrap(),
        metering,
        usage,
    }
}

/// The oslo 2.0 envelope around a message.
pub fn envelope(message: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": message.to_string()})).unwrap()
}

/// How long the lives before [`THE_HOUR`] are, and which of them end.
pub struct Shape {
    /// Hours from the launch to [`THE_HOUR`]: at least the first, less than the second.
    pub hours: (i64, i64),
    /// The first `1 / ended` of the instances end (1: all of them).
    pub ended: usize,
    /// Of those, every `resized`-th one is resized first (0: none).
    pub resized: usize,
}

impl Shape {
    /// The fault scenarios' lives: 2 to 6 hours before [`THE_HOUR`], half of them ended, a third
    /// of those resized.
    pub const FAULTS: Shape = Shape { hours: (2, 6), ended: 2, resized: 3 };
}

/// A generator of valid traffic for one scenario.
pub struct Traffic {
    tag: u32,
    templates: Templates,
    next_message: u64,
}

impl Traffic {
    /// Traffic whose ids carry `tag` (so that scenarios never share an id).
    pub fn new(tag: u32) -> Self {
        Self { tag, templates: templates(), next_message: 0 }
    }

    fn message_id(&mut self) -> String {
        self.next_message += 1;
        format!("{:08x}-{:04x}-4000-8000-{:012x}", self.tag, 0xfa17, self.next_message)
    }

    /// The project id of project `p`.
    pub fn project(&self, p: usize) -> String {
        format!("{:08x}{:024x}", self.tag, p)
    }

    /// The instance uuid of instance `i`.
    pub fn instance(&self, i: usize) -> String {
        format!("{:08x}-0000-4000-8000-{:012x}", self.tag, i)
    }

    /// `total` valid messages over `instances` instances in `projects` projects, shaped as
    /// [`Shape::FAULTS`]: each project created, each instance created, the ended ones deleted
    /// (the resized ones resized first), and the rest metered usage: one sample of the test
    /// meter per message, 1 to 9 units, each at a second of its own inside its instance's life.
    /// The creations come first and the deletions last, as OpenStack sends them; retries and
    /// redeliveries reorder them, which the service must absorb. The resizes and what follows
    /// them are [`Later`].
    pub fn valid(
        &mut self,
        total: usize,
        projects: usize,
        instances: usize,
        rng: &mut Rng,
    ) -> (Vec<Message>, Later, Expected) {
        let (mut out, later, mut expected, lives) = self.lives(projects, instances, &Shape::FAULTS, rng);
        let deletes = out.split_off(projects + instances);
        assert!(total > out.len() + deletes.len() + later.len(), "room for usage");
        let usage = total - out.len() - deletes.len() - later.len();
        let mut taken = vec![0i64; instances];
        for _ in 0..usage {
            let i = rng.below(instances as u64) as usize;
            // Seconds from the launch on: every life lasts at least two hours before THE_HOUR.
            let at = lives[i].launched.0 + 1 + taken[i];
            taken[i] += 1;
            assert!(at < THE_HOUR, "a sample inside its instance's life");
            let volume = 1 + rng.below(9);
            out.push(self.usage(&lives[i], at, volume));
            expected.add_sample(&lives[i].instance, at, volume);
        }
        out.extend(deletes);
        (out, later, expected)
    }

    /// The lives of `instances` instances in `projects` projects, shaped by `shape`, and no
    /// usage: each project created, then each instance created, then the ended ones deleted;
    /// the resizes, and the deletes that follow them, are [`Later`].
    pub fn lifecycles(
        &mut self,
        projects: usize,
        instances: usize,
        shape: &Shape,
        rng: &mut Rng,
    ) -> (Vec<Message>, Later, Expected) {
        let (out, later, expected, _) = self.lives(projects, instances, shape, rng);
        (out, later, expected)
    }

    fn lives(
        &mut self,
        projects: usize,
        instances: usize,
        shape: &Shape,
        rng: &mut Rng,
    ) -> (Vec<Message>, Later, Expected, Vec<Life>) {
        let mut expected = Expected::default();
        let mut out = Vec::new();
        for p in 0..projects {
            let project = self.project(p);
            let mut m = self.templates.project_created.clone();
            m["message_id"] = json!(self.message_id());
            m["payload"]["resource_info"] = json!(project);
            out.push(Message {
                exchange: "keystone".into(),
                routing_key: "notifications.info".into(),
                body: envelope(&m),
            });
        }
        let (min, max) = shape.hours;
        let lives: Vec<Life> = (0..instances)
            .map(|i| {
                let launched = At(THE_HOUR - min * HOUR - rng.below(((max - min) * HOUR) as u64) as i64, rng.micros());
                let flavor = rng.below(FLAVORS.len() as u64) as usize;
                let end = (i < instances / shape.ended)
                    .then(|| At(THE_HOUR + 60 + rng.below((ENDS_WITHIN - 120) as u64) as i64, rng.micros()));
                let resize = end.filter(|_| shape.resized > 0 && i % shape.resized == 0).map(|e| {
                    let other = (flavor + 1 + rng.below(FLAVORS.len() as u64 - 1) as usize) % FLAVORS.len();
                    (At(THE_HOUR + rng.below((e.0 - THE_HOUR) as u64) as i64, rng.micros()), other)
                });
                Life { project: self.project(i % projects), instance: self.instance(i), launched, flavor, resize, end }
            })
            .collect();
        let mut later = Later::default();
        for life in &lives {
            let create = self.lifecycle(&self.templates.create_end.clone(), life, life.launched, life.flavor, None);
            out.push(create);
            expected.add_life(life);
        }
        for life in &lives {
            let Some(end) = life.end else { continue };
            let (launched, flavor) = life.resize.unwrap_or((life.launched, life.flavor));
            let delete = self.lifecycle(&self.templates.delete_end.clone(), life, launched, flavor, Some(end));
            match life.resize {
                None => out.push(delete),
                Some((resized, to)) => {
                    let resize = self.lifecycle(&self.templates.resize_end.clone(), life, resized, to, None);
                    later.resizes.push((life.instance.clone(), life.launched.0, resize));
                    later.deletes.push((life.instance.clone(), resized.0, delete));
                }
            }
        }
        (out, later, expected, lives)
    }

    /// A Nova message about `life` reporting `launched` with `flavor`, deleted at `end` when
    /// given (terminated then, deleted two seconds later: `terminated_at` is what ends billing).
    /// It is sent a little after what it reports.
    fn lifecycle(&mut self, template: &Value, life: &Life, launched: At, flavor: usize, end: Option<At>) -> Message {
        let Flavor(name, vcpus, memory_mb, root_gb, ephemeral_gb) = FLAVORS[flavor];
        let mut m = template.clone();
        m["message_id"] = json!(self.message_id());
        m["_context_project_id"] = json!(life.project);
        let sent = end.unwrap_or(launched);
        m["timestamp"] = json!(At(sent.0 + 3, sent.1).oslo());
        let p = &mut m["payload"];
        p["tenant_id"] = json!(life.project);
        p["instance_id"] = json!(life.instance);
        p["instance_type"] = json!(name);
        p["vcpus"] = json!(vcpus);
        p["memory_mb"] = json!(memory_mb);
        p["root_gb"] = json!(root_gb);
        p["ephemeral_gb"] = json!(ephemeral_gb);
        p["disk_gb"] = json!(root_gb + ephemeral_gb);
        p["launched_at"] = json!(launched.nova());
        p["terminated_at"] = json!(end.map(|e| e.nova()).unwrap_or_default());
        p["deleted_at"] = json!(end.map(|e| At(e.0 + 2, e.1).nova()).unwrap_or_default());
        Message { exchange: "nova".into(), routing_key: "notifications.info".into(), body: envelope(&m) }
    }

    /// A Ceilometer message with one sample of the test meter for `life`, at `at`, of `volume`.
    fn usage(&mut self, life: &Life, at: i64, volume: u64) -> Message {
        let mut m = self.templates.usage.clone();
        m["message_id"] = json!(self.message_id());
        m["timestamp"] = json!(At(at + 1, 0).oslo());
        let s = &mut m["payload"][0];
        s["message_id"] = json!(self.message_id());
        s["project_id"] = json!(life.project);
        s["resource_id"] = json!(life.instance);
        s["timestamp"] = json!(format!("{}+00:00", At(at, 0).nova()));
        s["counter_volume"] = json!(volume);
        s["resource_metadata"]["launched_at"] = json!(life.launched.nova());
        s["resource_metadata"]["flavor_name"] = json!(FLAVORS[life.flavor].0);
        Message { exchange: "ceilometer".into(), routing_key: "metering.sample".into(), body: envelope(&m) }
    }
}

/// `count` messages the decoder must refuse, each different (so the dead-letter queue can be
/// matched body for body), of every kind of breakage a bus sees.
pub fn invalid(count: usize, rng: &mut Rng) -> Vec<Message> {
    let t = templates();
    (0..count)
        .map(|i| {
            let (exchange, routing_key) = ("nova", "notifications.info");
            let body = match rng.below(10) {
                0 => format!("not json {i}").into_bytes(),
                1 => format!("[{i}]").into_bytes(),
                2 => serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": format!("{{not json {i}")}))
                    .unwrap(),
                3 => {
                    let mut m = t.create_end.clone();
                    m.as_object_mut().unwrap().remove("message_id");
                    m["_unique_id"] = json!(i);
                    envelope(&m)
                }
                4 => {
                    let mut m = t.metering.clone();
                    m["message_id"] = json!(format!("flood-{i}"));
                    m["payload"][0]["counter_volume"] = json!("many");
                    envelope(&m)
                }
                5 => {
                    let mut m = t.create_end.clone();
                    m["message_id"] = json!(format!("flood-{i}"));
                    m["payload"]["launched_at"] = json!([i]);
                    envelope(&m)
                }
                6 => {
                    let mut body = envelope(
                        &json!({"message_id": format!("flood-{i}"), "event_type": "compute.instance.create.end"}),
                    );
                    body.splice(2..2, [0xff, 0xfe]);
                    body
                }
                7 => serde_json::to_vec(&json!({"oslo.version": "3.0", "oslo.message": format!("{{\"n\": {i}}}")}))
                    .unwrap(),
                8 => {
                    let mut m = t.create_end.clone();
                    m["message_id"] = json!(format!("flood-{i}"));
                    m["payload"] = json!(format!("payload {i}"));
                    envelope(&m)
                }
                _ => {
                    let mut m = t.create_end.clone();
                    m["message_id"] = json!(format!("flood-{i}"));
                    m["timestamp"] = json!(format!("yesterday {i}"));
                    envelope(&m)
                }
            };
            Message { exchange: exchange.into(), routing_key: routing_key.into(), body }
        })
        .collect()
}

#[test]
fn the_hour_is_the_aligned_hour_named_in_the_docs() {
    assert_eq!(rfc3339(THE_HOUR), "2025-03-03T12:00:00Z");
    assert_eq!(THE_HOUR % HOUR, 0);
}
