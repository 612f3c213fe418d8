//! Generated traffic and what it must bill: projects, instances, usage and deletions in the
//! legacy Nova / Keystone / Ceilometer forms of the fixtures, with fresh ids, and the totals
//! computed from what was generated (not by running the service's own code).

use std::collections::{BTreeMap, BTreeSet};

use concertim_billing::{
    billing::ledger::{AccountRow, Snapshot, SubscriptionRow, UsageRow},
    event::{InstanceId, PlanName, ProjectId, Timestamp, Unit},
};
use lapin::BasicProperties;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::support::{bus::TestBus, deliveries};

/// The plan every flavor bills on with the embedded settings.
const PLAN: &str = "openstack-standard-monthly";
const VCPUS: &str = "openstack-billed-vcpus";
const MEMORY: &str = "openstack-billed-memory";
const LAUNCHED: &str = "2025-03-03T09:00:41Z";
const DELETED: &str = "2025-03-20T12:00:00Z";

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

/// What the generated valid traffic must bill, exactly.
#[derive(Default)]
pub struct Expected {
    accounts: BTreeSet<String>,
    /// instance → (project, end).
    subscriptions: BTreeMap<String, (String, Option<String>)>,
    /// (instance, unit) → total.
    usage: BTreeMap<(String, String), Decimal>,
    /// (instance, trackingId) → amount over its units.
    records: BTreeMap<(String, String), Decimal>,
    /// Messages that bill something or create something (not the invalid ones).
    pub valid: usize,
}

impl Expected {
    /// The totals as the fake KillBill's snapshot reports them.
    pub fn snapshot(&self) -> Snapshot {
        let accounts = self
            .accounts
            .iter()
            .map(|p| AccountRow { project_id: ProjectId::parse(p.clone()).unwrap(), state: "open" })
            .collect();
        let subscriptions = self
            .subscriptions
            .iter()
            .map(|(instance, (project, end))| SubscriptionRow {
                instance_id: InstanceId::parse(instance.clone()).unwrap(),
                project_id: ProjectId::parse(project.clone()).unwrap(),
                plan: PlanName::parse(PLAN).unwrap(),
                state: if end.is_some() { "cancelled" } else { "active" },
                start: Timestamp::parse(LAUNCHED).unwrap(),
                end: end.as_deref().map(|e| Timestamp::parse(e).unwrap()),
            })
            .collect();
        let usage = self
            .usage
            .iter()
            .map(|((instance, unit), amount)| UsageRow {
                instance_id: InstanceId::parse(instance.clone()).unwrap(),
                unit: Unit::parse(unit.clone()).unwrap(),
                amount: amount.normalize(),
            })
            .collect();
        Snapshot { accounts, subscriptions, usage, late_records: 0 }
    }

    /// Usage messages (trackingIds) expected.
    pub fn usage_messages(&self) -> usize {
        self.records.len()
    }

    /// Compares the usage rows KillBill holds with what was published: (lost, duplicated), in
    /// usage messages. A message is lost when KillBill holds less than its amount under its
    /// trackingId, duplicated when it holds more, or holds it twice, or under an unknown id.
    pub fn lost_and_duplicated(&self, rows: &[(String, String, String, Decimal)]) -> (usize, usize) {
        let mut held: BTreeMap<(String, String), (Decimal, usize)> = BTreeMap::new();
        let mut rows_per_unit: BTreeMap<(String, String, String), usize> = BTreeMap::new();
        for (instance, unit, tracking, amount) in rows {
            let entry = held.entry((instance.clone(), tracking.clone())).or_default();
            entry.0 += amount;
            entry.1 += 1;
            *rows_per_unit.entry((instance.clone(), unit.clone(), tracking.clone())).or_default() += 1;
        }
        let lost = self.records.iter().filter(|(key, amount)| held.get(*key).is_none_or(|h| h.0 < **amount)).count();
        let mut duplicated: BTreeSet<(String, String)> = held
            .iter()
            .filter(|(key, h)| self.records.get(*key).is_none_or(|amount| h.0 > *amount))
            .map(|(key, _)| key.clone())
            .collect();
        duplicated.extend(
            rows_per_unit
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|((instance, _, tracking), _)| (instance.clone(), tracking.clone())),
        );
        (lost, duplicated.len())
    }
}

/// Templates from the legacy Nova lifecycle fixture: the inner oslo message of each event type.
struct Templates {
    project_created: Value,
    create_end: Value,
    delete_end: Value,
    metering: Value,
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
    Templates {
        project_created: found.remove("identity.project.created").unwrap(),
        create_end: found.remove("compute.instance.create.end").unwrap(),
        delete_end: found.remove("compute.instance.delete.end").unwrap(),
        metering,
    }
}

/// The oslo 2.0 envelope around a message.
pub fn envelope(message: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": message.to_string()})).unwrap()
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

    /// `total` valid messages over `instances` instances in `projects` projects: each project
    /// created, each instance created, half of them deleted, the rest usage (a vCPU and a
    /// memory sample per message, the volume varying), dated inside the instance's life. The
    /// creations come first and the deletions last, as OpenStack sends them; retries and
    /// redeliveries reorder them, which the service must absorb.
    pub fn valid(
        &mut self,
        total: usize,
        projects: usize,
        instances: usize,
        rng: &mut Rng,
    ) -> (Vec<Message>, Expected) {
        let deleted = instances / 2;
        assert!(total > projects + instances + deleted, "room for usage");
        let mut expected = Expected::default();
        let mut out = Vec::with_capacity(total);
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
            expected.accounts.insert(project);
        }
        for i in 0..instances {
            let (project, instance) = (self.project(i % projects), self.instance(i));
            let m = self.instance_message(&self.templates.create_end.clone(), &project, &instance, None);
            out.push(Message { exchange: "nova".into(), routing_key: "notifications.info".into(), body: envelope(&m) });
            expected.subscriptions.insert(instance, (project, None));
        }
        let usage = total - projects - instances - deleted;
        for n in 0..usage {
            let i = rng.below(instances as u64) as usize;
            let (project, instance) = (self.project(i % projects), self.instance(i));
            let vcpus = 1 + rng.below(4);
            let id = self.message_id();
            let mut m = self.templates.metering.clone();
            m["message_id"] = json!(id);
            // Samples every second from 10:00 on the launch day: always inside the life.
            let at = Timestamp::parse("2025-03-03T10:00:00Z").unwrap().as_offset()
                + time::Duration::seconds(n as i64 % 86_400);
            let at = Timestamp::parse(&at.format(&time::format_description::well_known::Rfc3339).unwrap()).unwrap();
            for s in m["payload"].as_array_mut().unwrap() {
                s["project_id"] = json!(project);
                s["resource_id"] = json!(instance);
                s["timestamp"] = json!(at.to_rfc3339());
                s["message_id"] = json!(self.message_id());
                s["resource_metadata"]["launched_at"] = json!(LAUNCHED);
                if s["counter_name"] == "vcpus" {
                    s["counter_volume"] = json!(vcpus);
                }
            }
            let vcpu_minutes = Decimal::from(vcpus * 10);
            let memory_minutes = Decimal::from(20); // 2048 MB × 10/1024
            *expected.usage.entry((instance.clone(), VCPUS.into())).or_default() += vcpu_minutes;
            *expected.usage.entry((instance.clone(), MEMORY.into())).or_default() += memory_minutes;
            expected.records.insert((instance, id), vcpu_minutes + memory_minutes);
            out.push(Message {
                exchange: "ceilometer".into(),
                routing_key: "metering.sample".into(),
                body: envelope(&m),
            });
        }
        for i in 0..deleted {
            let (project, instance) = (self.project(i % projects), self.instance(i));
            let m = self.instance_message(&self.templates.delete_end.clone(), &project, &instance, Some(DELETED));
            out.push(Message { exchange: "nova".into(), routing_key: "notifications.info".into(), body: envelope(&m) });
            expected.subscriptions.insert(instance, (project, Some(DELETED.into())));
        }
        expected.valid = out.len();
        (out, expected)
    }

    fn instance_message(&mut self, template: &Value, project: &str, instance: &str, deleted: Option<&str>) -> Value {
        let mut m = template.clone();
        m["message_id"] = json!(self.message_id());
        m["_context_project_id"] = json!(project);
        let p = &mut m["payload"];
        p["tenant_id"] = json!(project);
        p["instance_id"] = json!(instance);
        p["instance_type"] = json!("m1.small");
        p["launched_at"] = json!(LAUNCHED);
        if let Some(at) = deleted {
            p["deleted_at"] = json!(at);
            p["terminated_at"] = json!(at);
        }
        m
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
