//! The real binary on a three-node RabbitMQ cluster, given oslo's multi-host `bus.url`, billing
//! to the fake KillBill while traffic is published at a steady rate: the node it consumes from
//! is stopped, then the node leading the main quorum queue (two of three down: the queue has no
//! quorum), then the leader is started again, then the first node. Every metered sample and
//! instance period ends in KillBill once.
//!
//! The cluster is `deploy/dev/rabbitmq-cluster.sh`'s (deploy/dev/test.sh starts it and sets
//! `CONCERTIM_BILLING_TEST_CLUSTER_URL`); the script is the one place that knows its nodes. Without
//! the variable the test says it skipped, unless `CONCERTIM_BILLING_REQUIRE_CLUSTER` is set. The
//! single broker of the other scenarios is not touched, so the test does not take
//! [`crate::BROKER_LOCK`].

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use lapin::{options::BasicPublishOptions, BasicProperties, Channel, Connection};

use crate::{
    assert_exact, assert_settled, dead_letters,
    kill::{service_command, state_store},
    settle, soak,
    support::{
        bus::{cli_command, connect_any, signal, TestBus},
        killbill::FakeKillBill,
        root,
        wait::eventually,
    },
    traffic::{seed, Message, Rng, Traffic},
    Row,
};

/// The variable naming the cluster, in oslo's multi-host form.
const CLUSTER_ENV: &str = "CONCERTIM_BILLING_TEST_CLUSTER_URL";

/// Set, the cluster's absence fails the test instead of skipping it.
const REQUIRE_ENV: &str = "CONCERTIM_BILLING_REQUIRE_CLUSTER";

/// The name the service gives its billing consumer's connection (its consumer tag too).
const CONNECTION: &str = "concertim-billing";

/// The publisher's pace: `PER_TICK` messages every `TICK` (200 a second).
const TICK: Duration = Duration::from_millis(100);
const PER_TICK: usize = 20;

/// How long the publisher waits for a confirm before it publishes the message again.
const CONFIRM_WAIT: Duration = Duration::from_secs(3);

/// The dev cluster, driven through `deploy/dev/rabbitmq-cluster.sh`.
struct Cluster {
    url: String,
    script: PathBuf,
}

impl Cluster {
    /// The cluster test.sh started, or `None` (said on stderr) when there is none.
    fn from_env() -> Option<Cluster> {
        let Ok(url) = std::env::var(CLUSTER_ENV) else {
            assert!(
                std::env::var_os(REQUIRE_ENV).is_none(),
                "{REQUIRE_ENV} is set but {CLUSTER_ENV} is not: deploy/dev/test.sh starts the cluster and sets it"
            );
            eprintln!("skipped: {CLUSTER_ENV} is not set (deploy/dev/test.sh starts a three-node cluster and sets it)");
            return None;
        };
        Some(Cluster { url, script: root().join("deploy/dev/rabbitmq-cluster.sh") })
    }

    /// Runs the script with `args`; its stdout, trimmed. Panics when it fails.
    async fn run(&self, args: &[&str]) -> String {
        let mut command = std::process::Command::new(&self.script);
        command.args(args).stderr(std::process::Stdio::inherit());
        let what = args.join(" ");
        let out = tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("the script runs");
        assert!(out.status.success(), "rabbitmq-cluster.sh {what} failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The node (a, b or c) holding the client connection named `name`.
    async fn node_of(&self, name: &str) -> Option<String> {
        Some(self.run(&["node-of", name]).await).filter(|n| !n.is_empty())
    }

    /// The node leading the quorum queue `queue`.
    async fn leader_of(&self, queue: &str) -> Option<String> {
        Some(self.run(&["leader-of", queue]).await).filter(|n| !n.is_empty())
    }

    async fn stop_node(&self, node: &str) {
        self.run(&["stop-node", node]).await;
    }

    async fn start_node(&self, node: &str) {
        self.run(&["start-node", node]).await;
    }
}

/// Starts every node again if the test ends while some are stopped (a failed assertion).
struct Restore<'a>(&'a Path);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new(self.0).arg("start").status();
    }
}

/// The service's process, killed if the test ends before it stopped it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().is_ok_and(|status| status.is_none()) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A channel in confirm mode on whichever node of the cluster answers.
async fn open(broker: &str) -> (Connection, Channel) {
    let connection = eventually("a node of the cluster to accept the publisher", Duration::from_secs(120), || async {
        connect_any(broker).await.ok()
    })
    .await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.unwrap();
    (connection, channel)
}

/// Publishes `messages`, persistent, `PER_TICK` every `TICK`, to whichever node answers, as
/// OpenStack's publishers keep publishing through a failover: a message the broker does not
/// confirm within `CONFIRM_WAIT` (its node stopped under it, or the queue without a quorum) is
/// published again on a new connection until one is confirmed. A message may so reach the queue
/// twice, which billing absorbs (its keys come from the message id). `sent` counts the
/// confirmed messages, `resent` the publishes repeated.
async fn publish_steadily(bus: &TestBus, messages: &[Message], sent: &AtomicUsize, resent: &AtomicUsize) {
    let mut open_channel: Option<(Connection, Channel)> = None;
    let mut tick = tokio::time::interval(TICK);
    for batch in messages.chunks(PER_TICK) {
        tick.tick().await;
        let mut pending: Vec<&Message> = batch.iter().collect();
        while !pending.is_empty() {
            let channel = match &open_channel {
                Some((_, channel)) if channel.status().connected() => channel.clone(),
                _ => {
                    let (connection, channel) = open(&bus.broker).await;
                    open_channel = Some((connection, channel.clone()));
                    channel
                }
            };
            let mut confirms = Vec::with_capacity(pending.len());
            for m in &pending {
                let properties =
                    BasicProperties::default().with_content_type("application/json".into()).with_delivery_mode(2);
                let publish = channel.basic_publish(
                    bus.exchange(&m.exchange).as_str().into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &m.body,
                    properties,
                );
                confirms.push((*m, tokio::time::timeout(CONFIRM_WAIT, publish).await.ok().and_then(Result::ok)));
            }
            let mut unconfirmed = Vec::new();
            for (m, confirm) in confirms {
                let confirmed = match confirm {
                    Some(confirm) => {
                        tokio::time::timeout(CONFIRM_WAIT, confirm).await.is_ok_and(|c| c.is_ok_and(|c| c.is_ack()))
                    }
                    None => false,
                };
                if !confirmed {
                    unconfirmed.push(m);
                }
            }
            if !unconfirmed.is_empty() {
                resent.fetch_add(unconfirmed.len(), Ordering::SeqCst);
                // A new connection, perhaps to another node, for the messages to publish again.
                if let Some((connection, _)) = open_channel.take() {
                    let _ = tokio::time::timeout(CONFIRM_WAIT, connection.close(200, "republishing".into())).await;
                }
            }
            sent.fetch_add(pending.len() - unconfirmed.len(), Ordering::SeqCst);
            pending = unconfirmed;
        }
    }
    if let Some((connection, _)) = open_channel {
        let _ = connection.close(200, "done".into()).await;
    }
}

/// The metered samples KillBill holds: usage that only a consumed message brings (settlement
/// posts instance periods on its own, without the broker).
fn samples(fake: &FakeKillBill) -> usize {
    fake.usage_records().iter().filter(|(_, _, tracking, _)| tracking.starts_with("s1:")).count()
}

/// Waits until KillBill records a metered sample it does not hold now, and returns how long
/// that was after `fault`: how long the service took to consume again. (A node's stop ends its
/// client connections first, so what is in flight when it returns has been settled or is lost
/// with the connection.)
async fn billing_again(fake: &FakeKillBill, fault: Instant, limit: Duration) -> Duration {
    let held = samples(fake);
    eventually("billing to resume", limit, || async { (samples(fake) > held).then_some(()) }).await;
    fault.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_connected_node_then_the_queue_leader_of_a_three_node_cluster_loses_nothing_and_bills_nothing_twice()
{
    let Some(cluster) = Cluster::from_env() else { return };
    // A minute of traffic at 200 messages a second (ten in the soak variant).
    let total = if soak() { 120_000 } else { 12_000 };
    let mut rng = Rng::new(seed("cluster"));
    let (messages, later, expected) = Traffic::new(0xf1).valid(total, 10, 100, &mut rng);
    let fake = FakeKillBill::start().await;
    // One write in 50, 40 times, takes effect and loses its answer: the message goes through
    // the retry queue (in-process retries are off below), and its retry meets KillBill's
    // answer to a repeated write.
    fake.lose_answers(50, 40);
    let mut bus = TestBus::on(&cluster.url, "faults-cluster").await;
    // Room for the redeliveries each lost node causes.
    bus.settings.bus.max_attempts = 20;
    let queue = bus.names().queue;
    let dir = tempfile::tempdir().unwrap();
    let (log, state) = (dir.path().join("service.log"), dir.path().join("state.db"));
    let declared = cli_command(&bus).args(["topology", "declare"]).output().unwrap();
    assert!(declared.status.success(), "{}", String::from_utf8_lossy(&declared.stderr));
    let members = cluster.run(&["members-of", &queue]).await;
    assert_eq!(members, "a b c", "the main quorum queue has a replica on every node");
    let mut service = Running(
        service_command(&bus, &fake, &state, &log, crate::kill::free_port())
            .env("CONCERTIM_BILLING_BUS__BACKOFF__MAX_ELAPSED_MS", "0")
            .spawn()
            .expect("the binary starts"),
    );
    let store = state_store(&bus, &state).await;
    let restore = Restore(&cluster.script);

    let (sent, resent) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let limit = Duration::from_secs(300);
    let faults = async {
        // 1. The node the service consumes from, once a tenth of the traffic is out and billed.
        eventually("a tenth of the traffic published and billed", limit, || async {
            (sent.load(Ordering::SeqCst) * 10 >= messages.len() && samples(&fake) > 0).then_some(())
        })
        .await;
        let connected =
            eventually("the service's connection", limit, || async { cluster.node_of(CONNECTION).await }).await;
        let fault = Instant::now();
        cluster.stop_node(&connected).await;
        let after_connected = billing_again(&fake, fault, limit).await;
        let moved_to = eventually("the service's connection on another node", limit, || async {
            cluster.node_of(CONNECTION).await.filter(|n| *n != connected)
        })
        .await;
        eprintln!(
            "cluster: node {connected} (the service's) stopped at {} messages published; billing again \
             {after_connected:.1?} after the stop began, on node {moved_to}",
            sent.load(Ordering::SeqCst)
        );
        // 2. The main queue's leader now (the first node may have led it): no quorum left.
        eventually("a quarter of the traffic published", limit, || async {
            (sent.load(Ordering::SeqCst) * 4 >= messages.len()).then_some(())
        })
        .await;
        let leader = eventually("the main queue's leader", limit, || async {
            cluster.leader_of(&queue).await.filter(|n| *n != connected)
        })
        .await;
        let repeated = resent.load(Ordering::SeqCst);
        cluster.stop_node(&leader).await;
        // The publisher finds the queue without a quorum: its publishes go unconfirmed.
        eventually("a publish unconfirmed without a quorum", limit, || async {
            (resent.load(Ordering::SeqCst) > repeated).then_some(())
        })
        .await;
        eprintln!(
            "cluster: node {leader} (the queue's leader) stopped too at {} messages published; no quorum",
            sent.load(Ordering::SeqCst)
        );
        // 3. The leader back: a quorum again.
        let fault = Instant::now();
        cluster.start_node(&leader).await;
        let after_quorum = billing_again(&fake, fault, limit).await;
        eprintln!("cluster: node {leader} started; billing again {after_quorum:.1?} after the start began");
        // 4. The first node back: the cluster whole.
        cluster.start_node(&connected).await;
        (connected, moved_to, leader, after_connected, after_quorum, Instant::now())
    };
    let publishing = publish_steadily(&bus, &messages, &sent, &resent);
    let ((), (connected, moved_to, leader, after_connected, after_quorum, last_fault)) =
        tokio::join!(publishing, faults);
    // The test's own connection was on a stopped node.
    bus.reconnect(limit).await;
    later.publish(&bus, &store).await;
    settle(&bus, &fake, &store, &expected, 0, limit).await;
    let recovered = last_fault.elapsed();
    signal(&service.0, "TERM");
    let status = service.0.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM ends the service cleanly");
    drop(restore);

    let (lost, duplicated) = assert_exact("cluster", &fake, &expected);
    assert_settled("cluster", &store, &expected).await;
    let dead = dead_letters(&bus).await;
    assert!(dead.is_empty(), "nothing is dead-lettered: {:?}", dead.iter().map(|d| &d.reason).collect::<Vec<_>>());
    let retried = fake.answered_code(50000);
    assert!(retried > 0, "retries through the retry queue met KillBill's answer to a repeated usage call");
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "the service panicked:\n{stderr}");
    let resent = resent.load(Ordering::SeqCst);
    eprintln!(
        "cluster: failover: connected node {connected} stopped -> billing again {:.1} s after the stop began (on \
         node {moved_to}); leader {leader} stopped (no quorum), then started -> billing again {:.1} s after the \
         start began (the node's boot included)",
        after_connected.as_secs_f64(),
        after_quorum.as_secs_f64()
    );
    Row {
        scenario: "three-node cluster: connected node, then queue leader stopped",
        messages: messages.len() + later.len(),
        faults: format!(
            "node {connected} (connected) stopped: billing again in {:.1} s; then leader {leader} stopped (no \
             quorum) and started: billing again {:.1} s after its start began; {resent} publishes repeated, \
             {retried} retries met 400/50000",
            after_connected.as_secs_f64(),
            after_quorum.as_secs_f64()
        ),
        lost,
        duplicated,
        dead_lettered: 0,
        recovered,
    }
    .print();
    bus.cleanup().await;
}
