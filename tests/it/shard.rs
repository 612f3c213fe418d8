//! The sharded topology: replicas share the shards through single active consumers, each
//! project handled by one replica at a time and in order, and a stopped replica's shards move
//! to the others.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use concertim_billing::{
    billing::{
        hooks::{self, Hooked, Hooks},
        Applied, BillingError, Context, Ledger,
    },
    bus::ack,
    event::Timestamp,
    executor::{Delivery, Executor},
    fixture::FixtureDelivery,
};
use lapin::BasicProperties;

use crate::support::{
    self,
    bus::{spawn_app, Proxy, TestBus},
    wait::eventually,
};

/// One recorded usage call: which replica, which project, which message of that project.
#[derive(Debug, Clone)]
struct Call {
    replica: &'static str,
    project: String,
    seq: usize,
    done: bool,
}

/// Records, for the ledger every replica shares, the order of usage calls.
struct Log {
    replica: &'static str,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Hooks for Log {
    fn after(&self, call: hooks::Call<'_>, ctx: Context<'_>, result: &Result<Applied, BillingError>) {
        if !matches!(call, hooks::Call::RecordUsage(_)) {
            return;
        }
        // Message ids are "<project>-<seq>".
        let id = ctx.meta.message_id.to_string();
        let (project, seq) = id.rsplit_once('-').expect("a test message id");
        self.calls.lock().unwrap().push(Call {
            replica: self.replica,
            project: project.to_owned(),
            seq: seq.parse().unwrap(),
            done: matches!(result, Ok(Applied::Done)),
        });
    }
}

/// `per_project` Ceilometer messages for each of `projects` projects (one instance each),
/// interleaved round-robin as many projects' traffic is; message ids are `<project>-<seq>`. Each
/// carries one sample of the metered test meter, a second after the project's previous one (a
/// sample's time is its usage's key).
fn interleaved(template: &FixtureDelivery, projects: usize, per_project: usize) -> Vec<FixtureDelivery> {
    let template = support::bus::test_usage_of(template);
    let envelope: serde_json::Value = serde_json::from_slice(&template.body).unwrap();
    let mut message: serde_json::Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    let sample = message["payload"][0].clone();
    let base = Timestamp::parse(sample["timestamp"].as_str().unwrap()).unwrap();
    let mut out = Vec::with_capacity(projects * per_project);
    for seq in 0..per_project {
        for p in 0..projects {
            let project = format!("{p:032x}");
            let mut sample = sample.clone();
            sample["project_id"] = project.clone().into();
            sample["resource_id"] = format!("00000000-0000-4000-8000-{p:012x}").into();
            sample["message_id"] = format!("{project}-{seq:05}-sample").into();
            let at = Timestamp::from_unix(base.unix() + seq as i64).unwrap();
            sample["timestamp"] = at.to_rfc3339().into();
            message["payload"] = serde_json::json!([sample]);
            message["message_id"] = format!("{project}-{seq:05}").into();
            let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
            out.push(FixtureDelivery { body: serde_json::to_vec(&body).unwrap(), ..template.clone() });
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sharded_replicas_keep_each_projects_order_and_a_stopped_ones_shards_move_to_the_other() {
    const PROJECTS: usize = 40;
    const PER_PROJECT: usize = 50;
    let mut bus = TestBus::new("shard").await;
    bus.settings.bus.shards = 4;
    bus.settings.bus.intake_standby_ms = 100;
    let template = support::deliveries("out-of-order")
        .into_iter()
        .find(|d| d.routing_key.as_deref() == Some("metering.sample"))
        .expect("a Ceilometer fixture");
    let messages = interleaved(&template, PROJECTS, PER_PROJECT);

    let ledger = Arc::new(Ledger::in_memory());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let replica = |name| Hooked { inner: Arc::clone(&ledger), hooks: Log { replica: name, calls: Arc::clone(&calls) } };
    // Replica "a" reaches the broker through a proxy, so that it can vanish as a crashed
    // process does: its connections drop and it cannot reconnect.
    let proxy = Proxy::start().await;
    let a = spawn_app(&bus, replica("a"), Some(proxy.url.clone())).await;
    let b = spawn_app(&bus, replica("b"), None).await;
    // An invalid message goes through the intake and a shard to the dead-letter queue, still
    // naming the exchange it was published to.
    let ceilometer = bus.exchange("ceilometer");
    bus.publish_raw(&ceilometer, "metering.sample", b"{not json", BasicProperties::default()).await;
    let publisher = {
        let messages = messages.clone();
        let bus = TestBus::new("shard-publisher").await;
        let exchange = ceilometer.clone();
        tokio::spawn(async move {
            for m in &messages {
                bus.publish_raw(&exchange, "metering.sample", &m.body, BasicProperties::default()).await;
            }
        })
    };

    let done = |calls: &Mutex<Vec<Call>>| calls.lock().unwrap().iter().filter(|c| c.done).count();
    eventually("a third of the messages billed", Duration::from_secs(60), || async {
        (done(&calls) >= messages.len() / 3).then_some(())
    })
    .await;
    proxy.set_down(true);
    let stopped = Instant::now();
    let calls_at_stop = calls.lock().unwrap().len();
    eventually("the other replica to take over", Duration::from_secs(30), || async {
        calls.lock().unwrap()[calls_at_stop..].iter().any(|c| c.replica == "b").then_some(())
    })
    .await;
    let takeover = stopped.elapsed();
    publisher.await.unwrap();
    eventually("every message billed", Duration::from_secs(60), || async {
        (done(&calls) >= messages.len()).then_some(())
    })
    .await;
    eprintln!("sharded failover: the other replica billed again {takeover:?} after the first stopped");

    let calls = calls.lock().unwrap().clone();
    // Every message billed exactly once (a redelivered one finds its usage recorded).
    let mut billed: BTreeMap<(String, usize), usize> = BTreeMap::new();
    for c in calls.iter().filter(|c| c.done) {
        *billed.entry((c.project.clone(), c.seq)).or_default() += 1;
    }
    assert_eq!(billed.len(), messages.len(), "every message billed");
    assert!(billed.values().all(|n| *n == 1), "no message billed twice");
    // Per project: billed in publication order, by one replica until the stop, then by the other.
    let mut by_project: BTreeMap<&str, Vec<&Call>> = BTreeMap::new();
    for c in calls.iter().filter(|c| c.done) {
        by_project.entry(&c.project).or_default().push(c);
    }
    for (project, calls) in &by_project {
        let seqs: Vec<usize> = calls.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (0..PER_PROJECT).collect::<Vec<_>>(), "project {project} in order");
        let replicas: Vec<&str> = calls.iter().map(|c| c.replica).collect();
        let switches = replicas.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(switches <= 1, "project {project} moved back and forth: {replicas:?}");
        assert!(!replicas.windows(2).any(|w| w == ["b", "a"]), "project {project} went back to the stopped replica");
    }
    let replicas: BTreeSet<&str> = calls.iter().filter(|c| c.done).map(|c| c.replica).collect();
    assert_eq!(replicas, BTreeSet::from(["a", "b"]), "both replicas billed");
    // The ledger holds what one process billing every message once holds.
    let offline = Executor::new(bus.settings.clone(), Ledger::in_memory());
    for m in &messages {
        offline.handle(Delivery { body: &m.body, redelivered: false }).await;
    }
    assert_eq!(ledger.snapshot(), offline.billing().snapshot());
    assert_eq!(ledger.snapshot().usage.len(), PROJECTS, "every project's instance billed");

    let dead = bus.drain(&bus.names().dead_queue).await;
    assert_eq!(dead.len(), 1, "only the invalid message is dead-lettered");
    let properties = &dead[0].delivery.properties;
    assert_eq!(ack::header_text(properties, ack::ORIGINAL_EXCHANGE).as_deref(), Some(ceilometer.as_str()));
    assert_eq!(ack::header_text(properties, ack::ORIGINAL_ROUTING_KEY).as_deref(), Some("metering.sample"));
    assert_eq!(ack::header_text(properties, ack::CLASS).as_deref(), Some("invalid"));

    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intake_lock_held_by_a_connection_that_moves_nothing_turns_readyz_unready_and_is_taken_over() {
    // Before: any client holding the exclusive lock queue stopped the intake for good, while
    // /readyz said ready.
    let mut bus = TestBus::new("shardstuck").await;
    bus.settings.bus.shards = 2;
    bus.settings.bus.intake_standby_ms = 100;
    bus.settings.bus.intake_takeover_ms = 3_000;
    let holder = concertim_billing::bus::connect(&bus.settings.bus, "holder").await.unwrap();
    let channel = holder.create_channel().await.unwrap();
    let lock = format!("{}.intake", bus.names().queue);
    let exclusive = lapin::options::QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    channel.queue_declare(lock.as_str().into(), exclusive, Default::default()).await.unwrap();

    let app = spawn_app(&bus, Ledger::in_memory(), None).await;
    let messages = support::bus::usage_batch(&support::bus::usage_fixture(), 10);
    for m in &messages {
        bus.publish(m).await;
    }
    let health = Arc::clone(&app.health);
    let (stuck, waiting) =
        eventually("/readyz to report the stuck intake", Duration::from_secs(30), || async { health.intake_stuck() })
            .await;
    eprintln!("intake stuck for {stuck:?} with {waiting} messages waiting");
    assert!(waiting > 0);

    let refs: Vec<&FixtureDelivery> = messages.iter().collect();
    let expected = support::run_with(bus.settings.clone(), Ledger::in_memory(), &refs).await.0.billing().snapshot();
    assert_eq!(expected.usage.len(), 1, "the batch bills the test meter: {:?}", expected.usage);
    let executor = &app.executor;
    eventually("the main queue taken over and everything billed", Duration::from_secs(60), || async {
        (executor.billing().snapshot().usage == expected.usage).then_some(())
    })
    .await;
    assert!(health.intake_stuck().is_none(), "ready again once taken over");
    let _ = holder.close(200, "done".into()).await;
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}
