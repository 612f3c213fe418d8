//! The operator tools against the real RabbitMQ: `dlq list|show|export|requeue|purge` and
//! `capture`, run as an operator runs them.

use std::{sync::atomic::Ordering, time::Duration};

use concertim_billing::{
    billing::Ledger,
    bus::{ack, topology},
    capture,
    config::Settings,
    executor::{Delivery, Executor},
    fixture::{self, FixtureDelivery},
};
use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};
use serde_json::Value;

use crate::support::{
    bus::{cli_command, faulty, signal, spawn_app, usage_batch, usage_fixture, TestBus},
    deliveries,
    wait::eventually,
};

const LIMIT: Duration = Duration::from_secs(60);

fn cli(bus: &TestBus, args: &[&str]) -> std::process::Output {
    let out = cli_command(bus).args(args).stderr(std::process::Stdio::piped()).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// `dlq list --json`, without the ages (they grow between two listings).
fn list_json(bus: &TestBus) -> Vec<Value> {
    let mut letters: Vec<Value> = serde_json::from_slice(&cli(bus, &["dlq", "list", "--json"]).stdout).unwrap();
    for letter in &mut letters {
        letter.as_object_mut().unwrap().remove("age_seconds");
    }
    letters
}

fn garbage(i: usize) -> FixtureDelivery {
    FixtureDelivery {
        body: format!("{{\"oslo.version\": \"2.0\", \"oslo.message\": \"{{broken {i}\"}}").into_bytes(),
        ..usage_fixture()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_invalid_and_exhausted_letters_in_the_same_order_twice_and_export_replays_them() {
    let bus = TestBus::new("dlqlist").await;
    let faulty = faulty();
    faulty.hooks.usage_always_fails.store(true, Ordering::SeqCst);
    let app = spawn_app(&bus, faulty, None).await;
    for i in 0..3 {
        bus.publish(&garbage(i)).await;
    }
    for d in usage_batch(&usage_fixture(), 3) {
        bus.publish(&d).await;
    }
    let dead = bus.names().dead_queue;
    eventually("6 dead letters", LIMIT, || async { (bus.depth(&dead).await == 6).then_some(()) }).await;
    app.shutdown().await.unwrap();

    let first = list_json(&bus);
    let second = list_json(&bus);
    assert_eq!(first, second, "listing changes nothing");
    assert_eq!(first.len(), 6);
    let classes: Vec<&str> = first.iter().map(|d| d["class"].as_str().unwrap()).collect();
    assert_eq!(classes.iter().filter(|c| **c == "invalid").count(), 3, "{classes:?}");
    assert_eq!(classes.iter().filter(|c| **c == "transient").count(), 3, "{classes:?}");
    for d in &first {
        let reason = d["reason"].as_str().unwrap();
        match d["class"].as_str().unwrap() {
            "invalid" => assert!(reason.starts_with("oslo.message is not valid"), "{reason}"),
            _ => assert!(reason.starts_with("exhausted after 3 attempts"), "{reason}"),
        }
    }
    let table = String::from_utf8(cli(&bus, &["dlq", "list"]).stdout).unwrap();
    assert!(table.contains("6 dead letter(s)") && table.contains("exhausted after 3 attempts"), "{table}");
    let show = String::from_utf8(cli(&bus, &["dlq", "show", first[0]["id"].as_str().unwrap()]).stdout).unwrap();
    assert!(show.contains("reason") && show.contains("original route"), "{show}");

    // Export, then replay the file offline: the invalid ones fail the same way.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dead.jsonl");
    cli(&bus, &["dlq", "export", "--out", file.to_str().unwrap()]);
    assert_eq!(bus.depth(&dead).await, 6, "export is non-destructive");
    let replay = cli_command(&bus)
        .args(["replay", "--report", "json", file.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(replay.status.code(), Some(3));
    let report: Value = serde_json::from_slice(&replay.stdout).unwrap();
    assert_eq!(report["invalid"], 3);
    let stderr = String::from_utf8(replay.stderr).unwrap();
    assert_eq!(stderr.matches("invalid: oslo.message is not valid").count(), 3, "{stderr}");
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_all_after_the_cause_is_fixed_empties_the_dead_letters_and_bills_each_once() {
    let bus = TestBus::new("dlqfix").await;
    let faulty = faulty();
    faulty.hooks.usage_always_fails.store(true, Ordering::SeqCst);
    let app = spawn_app(&bus, faulty, None).await;
    for d in usage_batch(&usage_fixture(), 4) {
        bus.publish(&d).await;
    }
    let dead = bus.names().dead_queue;
    eventually("4 dead letters", LIMIT, || async { (bus.depth(&dead).await == 4).then_some(()) }).await;

    // The backend is healthy again.
    app.executor.billing().hooks.usage_always_fails.store(false, Ordering::SeqCst);
    let dry = String::from_utf8(cli(&bus, &["dlq", "requeue", "--all", "--dry-run"]).stdout).unwrap();
    assert!(dry.contains("4 dead letter(s)") && dry.contains("dry run"), "{dry}");
    assert_eq!(bus.depth(&dead).await, 4);
    // Ceilometer's own queue on the upstream exchange: a requeue must not hand it copies.
    let neighbour = format!("{}metering.sample", bus.prefix);
    let channel = bus.channel();
    channel.queue_declare(neighbour.as_str().into(), Default::default(), FieldTable::default()).await.unwrap();
    let upstream = bus.exchange("ceilometer");
    channel
        .queue_bind(
            neighbour.as_str().into(),
            upstream.as_str().into(),
            "metering.sample".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    cli(&bus, &["dlq", "requeue", "--all"]);
    assert_eq!(bus.depth(&dead).await, 0);
    assert_eq!(bus.depth(&neighbour).await, 0, "the requeue went to the upstream exchange");
    let executor = &app.executor;
    eventually("every message billed", LIMIT, || async {
        (executor.billing().hooks.usage_recorded.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    let queue = bus.names().queue;
    eventually("the main queue to empty", LIMIT, || async { (bus.depth(&queue).await == 0).then_some(()) }).await;
    assert_eq!(executor.billing().hooks.usage_recorded.load(Ordering::SeqCst), 4, "each once");
    assert_eq!(bus.depth(&dead).await, 0);
    let _ = bus.channel().queue_delete(neighbour.as_str().into(), Default::default()).await;
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

/// Puts `count` distinct dead letters straight into the dead-letter queue, as the service
/// would have left them.
async fn seed_dead_letters(bus: &TestBus, count: usize) {
    let connection = concertim_billing::bus::connect(&bus.settings.bus, "seed").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    topology::declare(&channel, &bus.settings.bus).await.unwrap();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    for d in usage_batch(&usage_fixture(), count) {
        let mut headers = FieldTable::default();
        headers.insert(ack::REASON.into(), text("exhausted after 3 attempts: injected"));
        headers.insert(ack::CLASS.into(), text("transient"));
        headers.insert(ack::ATTEMPTS.into(), AMQPValue::LongLongInt(3));
        headers.insert(ack::ORIGINAL_EXCHANGE.into(), text(&bus.exchange("ceilometer")));
        headers.insert(ack::ORIGINAL_ROUTING_KEY.into(), text("metering.sample"));
        let properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        bus.publish_raw(&bus.names().dead_exchange, "metering.sample", &d.body, properties).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_killed_halfway_and_run_again_loses_nothing() {
    let bus = TestBus::new("dlqkill").await;
    seed_dead_letters(&bus, 1500).await;
    let names = bus.names();
    assert_eq!(bus.depth(&names.dead_queue).await, 1500);

    let mut requeue =
        cli_command(&bus).args(["dlq", "requeue", "--all"]).stdout(std::process::Stdio::null()).spawn().unwrap();
    eventually("the requeue to be under way", LIMIT, || async { (bus.depth(&names.queue).await > 0).then_some(()) })
        .await;
    signal(&requeue, "KILL");
    requeue.wait().unwrap();
    let moved_before_kill = bus.depth(&names.queue).await;
    cli(&bus, &["dlq", "requeue", "--all"]);

    assert_eq!(bus.depth(&names.dead_queue).await, 0);
    let requeued = bus.drain(&names.queue).await;
    let distinct: std::collections::BTreeSet<Vec<u8>> = requeued.iter().map(|m| m.delivery.data.clone()).collect();
    eprintln!("killed after {moved_before_kill} of 1500; {} requeued in all", requeued.len());
    assert_eq!(distinct.len(), 1500, "every dead letter is back (a duplicate is harmless, a loss is not)");
    let headers = requeued[0].delivery.properties.headers().clone().unwrap();
    assert!(!headers.contains_key(ack::ATTEMPTS), "a requeued message starts its attempts afresh");
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_yes_for_more_than_one_and_a_dead_broker_is_its_own_exit_status() {
    let bus = TestBus::new("dlqpurge").await;
    seed_dead_letters(&bus, 3).await;
    let out = cli_command(&bus).args(["dlq", "purge", "--all"]).stderr(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 3);
    cli(&bus, &["dlq", "purge", "--all", "--yes"]);
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0);

    let out = cli_command(&bus)
        .args(["dlq", "list", "--amqp-url", "amqp://guest:hunter2@127.0.0.1:1/%2f"])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("127.0.0.1:1") && !stderr.contains("hunter2"), "{stderr}");
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_replays_to_the_same_ledger_and_steals_nothing() {
    let bus = TestBus::new("capture").await;
    let fixtures: Vec<FixtureDelivery> = deliveries("").into_iter().filter(|d| bus.routes(d)).collect();
    let app = spawn_app(&bus, Ledger::in_memory(), None).await;
    let openstack_queue = bus.declare_openstack_queue().await;

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let settings = bus.settings.bus.clone();
    let count = fixtures.len();
    let tap = tokio::spawn(async move {
        let mut out = Vec::new();
        let mut ready = Some(ready_tx);
        let until = capture::Until { count: Some(count), duration: None };
        capture::capture(&settings, &mut out, until, false, tokio_util::sync::CancellationToken::new(), |n| {
            if n == 0 {
                let _ = ready.take().map(|r| r.send(()));
            }
        })
        .await
        .unwrap();
        out
    });
    ready_rx.await.unwrap();
    for d in &fixtures {
        bus.publish(d).await;
    }
    let captured = tokio::time::timeout(LIMIT, tap).await.unwrap().unwrap();

    // The capture file replays to the ledger of the fixtures themselves.
    let lines: Vec<FixtureDelivery> =
        String::from_utf8(captured).unwrap().lines().map(|l| fixture::parse_line(l).unwrap()).collect();
    assert_eq!(lines.len(), fixtures.len());
    let replay = |set: Vec<FixtureDelivery>| async move {
        let executor = Executor::new(Settings::embedded(), Ledger::in_memory());
        for d in &set {
            executor.handle(Delivery { body: &d.body, redelivered: false }).await;
        }
        executor.billing().snapshot()
    };
    let expected = replay(fixtures.clone()).await;
    assert_eq!(replay(lines).await, expected);
    // Our own queue and OpenStack's still got everything.
    let executor = &app.executor;
    eventually("the service to bill everything", LIMIT, || async {
        (executor.billing().snapshot() == expected).then_some(())
    })
    .await;
    let nova_info = fixtures
        .iter()
        .filter(|d| d.exchange.as_deref() == Some("nova") && d.routing_key.as_deref() == Some("notifications.info"))
        .count();
    assert_eq!(bus.depth(&openstack_queue).await as usize, nova_info);
    app.shutdown().await.unwrap();
    let _ = bus.channel().queue_delete(openstack_queue.as_str().into(), Default::default()).await;
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_all_goes_on_after_a_letter_with_nowhere_to_go_and_reports_it() {
    // Before, the first unroutable letter stopped the requeue: the letters behind it stayed.
    let bus = TestBus::new("dlqstuck").await;
    let connection = concertim_billing::bus::connect(&bus.settings.bus, "seed").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    topology::declare(&channel, &bus.settings.bus).await.unwrap();
    let _ = connection.close(200, "done".into()).await;
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    let mut headers = FieldTable::default();
    headers.insert(ack::REASON.into(), text("concertim: its queue was deleted since"));
    headers.insert(ack::ORIGINAL_EXCHANGE.into(), text(""));
    headers.insert(ack::ORIGINAL_ROUTING_KEY.into(), text(&format!("{}no-such-queue", bus.prefix)));
    let properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
    bus.publish_raw(&bus.names().dead_exchange, "", b"{\"stuck\": true}", properties).await;
    seed_dead_letters(&bus, 3).await;
    let dead = bus.names().dead_queue;
    assert_eq!(bus.depth(&dead).await, 4);
    let out =
        cli_command(&bus).args(["dlq", "requeue", "--all"]).stderr(std::process::Stdio::piped()).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("requeued 3 dead letter(s)"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not requeued, still in the dead-letter queue"));
    assert_eq!(bus.depth(&dead).await, 1, "only the letter with nowhere to go stays");
    assert_eq!(bus.depth(&bus.names().queue).await, 3);
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_and_export_keep_secrets_and_terminal_escapes_from_the_operator_whatever_the_body() {
    // Before: bodies that did not parse (NaN), nested and duplicate credential keys were shown
    // and exported byte for byte, escape sequences reached the terminal, and exports were 0644.
    let bus = TestBus::new("dlqredact").await;
    let connection = concertim_billing::bus::connect(&bus.settings.bus, "seed").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    topology::declare(&channel, &bus.settings.bus).await.unwrap();
    let _ = connection.close(200, "done".into()).await;
    let bodies: [&[u8]; 4] = [
        br#"{"oslo.version": "2.0", "oslo.message": "{\"_context_auth_token\": \"NanToken\", \"payload\": {\"volume\": NaN}}"}"#,
        br#"{"oslo.version": "2.0", "oslo.message": "{\"_context_service_token\": \"SvcToken\", \"ctxt\": {\"auth_token\": \"NestedCtx\"}, \"payload\": {\"metadata\": {\"admin_pass\": \"AdminPass\"}}}"}"#,
        br#"{"_context_auth_token":"DupToken","_context_auth_token":null,"event_type":"x"}"#,
        b"not json \x1b]0;PWNED-TITLE\x07\x1b[2J\x1b[1;1H fake: 0 dead letters\r\n\"password\": \"EscPass\"",
    ];
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    for body in bodies {
        let mut headers = FieldTable::default();
        headers.insert(ack::REASON.into(), text("invalid: evil.type\u{1b}[2J\nFORGED line"));
        headers.insert(ack::CLASS.into(), text("invalid"));
        let properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        bus.publish_raw(&bus.names().dead_exchange, "", body, properties).await;
    }
    let secrets = ["NanToken", "SvcToken", "NestedCtx", "AdminPass", "DupToken", "EscPass"];
    let letters = list_json(&bus);
    assert_eq!(letters.len(), 4);
    let table = cli(&bus, &["dlq", "list"]).stdout;
    assert!(!table.contains(&0x1b), "{}", String::from_utf8_lossy(&table));
    for letter in &letters {
        let shown = cli(&bus, &["dlq", "show", letter["id"].as_str().unwrap()]).stdout;
        let text = String::from_utf8(shown).unwrap();
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
        assert!(!text.contains("\nFORGED"), "{text}");
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dead.jsonl");
    cli(&bus, &["dlq", "export", "--out", file.to_str().unwrap()]);
    let exported = std::fs::read_to_string(&file).unwrap();
    assert_eq!(exported.lines().count(), 4);
    for secret in secrets {
        assert!(!exported.contains(secret), "{secret} exported: {exported}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // --no-redact is the operator's explicit choice, and still shows escapes escaped.
    let raw = cli(&bus, &["dlq", "show", "--no-redact", letters[3]["id"].as_str().unwrap()]).stdout;
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.contains("EscPass") && !raw.contains('\u{1b}'), "{raw}");
    bus.cleanup().await;
}
