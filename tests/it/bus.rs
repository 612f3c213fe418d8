//! The service on the real RabbitMQ at 127.0.0.1:5672: topology, acks after effects, retries,
//! dead letters, reconnection, shutdown. Each test has its own queue and exchange prefix.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use concertim_billing::{
    billing::{ledger::Snapshot, Ledger},
    bus::ack,
    config::{Binding, Settings},
    executor::{Delivery, Executor},
    fixture::FixtureDelivery,
};
use lapin::{
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties,
};

use crate::support::{
    bus::{billed_test_units, faulty, service_command, signal, spawn_app, usage_batch, usage_fixture, Proxy, TestBus},
    deliveries,
    wait::eventually,
};

const LIMIT: Duration = Duration::from_secs(60);

/// The fixtures the test bindings carry (those of Glance, Cinder and Neutron are not bound).
fn routed(bus: &TestBus) -> Vec<FixtureDelivery> {
    deliveries("").into_iter().filter(|d| bus.routes(d)).collect()
}

/// The ledger an offline replay of `fixtures` produces.
async fn offline(settings: &Settings, fixtures: &[FixtureDelivery]) -> Snapshot {
    let executor = Executor::new(settings.clone(), Ledger::in_memory());
    for d in fixtures {
        executor.handle(Delivery { body: &d.body, redelivered: d.redelivered }).await;
    }
    executor.billing().snapshot()
}

/// How many of `fixtures` cannot be decoded.
fn invalid_count(settings: &Settings, fixtures: &[FixtureDelivery]) -> u32 {
    let executor = Executor::new(settings.clone(), Ledger::in_memory());
    fixtures.iter().filter(|d| executor.decode(&d.body).is_err()).count() as u32
}

fn header(properties: &BasicProperties, name: &str) -> String {
    match ack::header(properties, name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::LongLongInt(n)) => n.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_lifecycles_published_upstream_end_in_the_same_ledger_as_the_offline_replay() {
    let bus = TestBus::new("lifecycle").await;
    let fixtures = routed(&bus);
    let expected = offline(&bus.settings, &fixtures).await;
    let invalid = invalid_count(&bus.settings, &fixtures);
    let app = spawn_app(&bus, Ledger::in_memory(), None).await;

    for d in &fixtures {
        bus.publish(d).await;
    }

    let executor = &app.executor;
    eventually("the ledger to match the offline replay", LIMIT, || async {
        (executor.billing().snapshot() == expected).then_some(())
    })
    .await;
    let dead = bus.names().dead_queue;
    eventually("the invalid fixtures in the dead-letter queue", LIMIT, || async {
        (bus.depth(&dead).await == invalid).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
    assert_eq!(bus.depth(&bus.names().queue).await, 0, "everything was acknowledged");
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_kinds_published_on_cinder_neutron_and_glance_end_in_the_offline_replays_ledger() {
    let mut bus = TestBus::new("kinds").await;
    // Bound as the default configuration binds them.
    for exchange in ["cinder", "neutron", "glance"] {
        let exchange = bus.exchange(exchange);
        bus.settings.bus.bindings.push(Binding { exchange, routing_key: "notifications.info".into() });
    }
    let fixtures: Vec<FixtureDelivery> =
        ["cinder", "neutron", "glance", "traffic"].into_iter().flat_map(deliveries).collect();
    let expected = offline(&bus.settings, &fixtures).await;
    // The volume, the snapshot, the floating IP and the private image subscribe at their
    // create; the interface only once settlement bills it, which this test leaves out.
    assert_eq!(expected.subscriptions.len(), 4, "{:?}", expected.subscriptions);
    let app = spawn_app(&bus, Ledger::in_memory(), None).await;

    for d in &fixtures {
        bus.publish(d).await;
    }

    // Every message taken and the ledger the same (a shutdown lets the ones in flight finish:
    // the attach, detach and public image change nothing it holds).
    let queue = bus.names().queue;
    let executor = Arc::clone(&app.executor);
    eventually("every message consumed and the ledger the offline replay's", LIMIT, || async {
        (bus.depth(&queue).await == 0 && executor.billing().snapshot() == expected).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
    assert_eq!(bus.depth(&queue).await, 0, "everything was acknowledged");
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0, "nothing was refused");
    assert_eq!(executor.billing().snapshot(), expected);
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_message_is_dead_lettered_byte_identical_with_its_reason_in_headers() {
    let bus = TestBus::new("invalid").await;
    let app = spawn_app(&bus, Ledger::in_memory(), None).await;
    let body = b"{\"oslo.version\": \"2.0\", \"oslo.message\": \"{not json\"} \xff trailing bytes";
    let mut headers = FieldTable::default();
    headers.insert("x-trace".into(), AMQPValue::LongString(LongString::from(b"abc".to_vec())));
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let nova = bus.exchange("nova");
    let sent = std::time::Instant::now();
    bus.publish_raw(&nova, "notifications.info", body, properties).await;

    let dead = bus.names().dead_queue;
    let mut messages = eventually("the message in the dead-letter queue", LIMIT, || async {
        let m = bus.drain(&dead).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    eprintln!("dead-lettered {:?} after publishing", sent.elapsed());
    assert_eq!(messages.len(), 1);
    let message = messages.remove(0);
    assert_eq!(message.delivery.data, body, "the body is byte-identical");
    let p = &message.delivery.properties;
    assert!(header(p, ack::REASON).starts_with("body is not valid"), "{}", header(p, ack::REASON));
    assert_eq!(header(p, ack::CLASS), "invalid");
    assert_eq!(header(p, ack::ATTEMPTS), "1");
    assert_eq!(header(p, ack::ORIGINAL_EXCHANGE), nova);
    assert_eq!(header(p, ack::ORIGINAL_ROUTING_KEY), "notifications.info");
    assert!(!header(p, ack::FIRST_FAILURE).is_empty() && !header(p, ack::LAST_FAILURE).is_empty());
    assert_eq!(header(p, "x-trace"), "abc", "the original headers are kept");
    assert_eq!(p.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_transiently_is_retried_and_bills_the_usage_once() {
    let mut bus = TestBus::new("transient").await;
    // No in-process retries, so each failure is one trip through the retry queue: two failures
    // mean success on the third and last attempt, whatever the timing.
    bus.settings.bus.backoff.max_elapsed_ms = 0;
    let fixture = usage_fixture();
    let expected = offline(&bus.settings, std::slice::from_ref(&fixture)).await;
    let faulty = faulty();
    faulty.hooks.usage_failures.store(2, Ordering::SeqCst);
    let app = spawn_app(&bus, faulty, None).await;
    bus.publish(&fixture).await;

    let executor = &app.executor;
    eventually("the usage to be billed", LIMIT, || async {
        (executor.billing().inner.snapshot() == expected).then_some(())
    })
    .await;
    assert_eq!(executor.billing().hooks.usage_failures.load(Ordering::SeqCst), 0, "every injected failure was hit");
    assert_eq!(executor.billing().hooks.usage_recorded.load(Ordering::SeqCst), 1, "recorded exactly once");
    let names = bus.names();
    eventually("the queues to empty", LIMIT, || async {
        (bus.depth(&names.queue).await == 0 && bus.depth(&names.retry_queue).await == 0).then_some(())
    })
    .await;
    assert_eq!(bus.depth(&names.dead_queue).await, 0);
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_always_fails_is_dead_lettered_as_exhausted_after_the_attempts() {
    let bus = TestBus::new("exhausted").await;
    let fixture = usage_fixture();
    let faulty = faulty();
    faulty.hooks.usage_always_fails.store(true, Ordering::SeqCst);
    let app = spawn_app(&bus, faulty, None).await;
    bus.publish(&fixture).await;

    let dead = bus.names().dead_queue;
    let mut messages = eventually("the message in the dead-letter queue", LIMIT, || async {
        let m = bus.drain(&dead).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    let message = messages.remove(0);
    let p = &message.delivery.properties;
    assert_eq!(header(p, ack::CLASS), "transient");
    assert_eq!(header(p, ack::ATTEMPTS), "3");
    let reason = header(p, ack::REASON);
    assert!(reason.starts_with("exhausted after 3 attempts: metering: record usage"), "{reason}");
    assert_eq!(header(p, ack::ORIGINAL_EXCHANGE), bus.exchange("ceilometer"), "kept across retries");
    assert_eq!(message.delivery.data, fixture.body);
    // Nothing was dropped on the way: the only copy is the dead letter.
    let names = bus.names();
    assert_eq!(bus.depth(&names.queue).await + bus.depth(&names.retry_queue).await, 0);
    assert!(messages.is_empty());
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_dead_letters_its_message_and_the_service_keeps_running() {
    let bus = TestBus::new("panic").await;
    let all = routed(&bus);
    let keystone = |d: &&FixtureDelivery| d.exchange.as_deref() == Some("keystone");
    let doomed = all.iter().find(keystone).unwrap().clone();
    let doomed_project = Executor::new(bus.settings.clone(), Ledger::in_memory())
        .decode(&doomed.body)
        .unwrap()
        .event
        .project()
        .unwrap()
        .to_string();
    let healthy = all.iter().filter(keystone).find(|d| !String::from_utf8_lossy(&d.body).contains(&doomed_project));
    let healthy = healthy.unwrap().clone();
    let mut faulty = faulty();
    faulty.hooks.panic_on_project = Some(doomed_project);
    let app = spawn_app(&bus, faulty, None).await;
    bus.publish(&doomed).await;
    bus.publish(&healthy).await;

    let dead = bus.names().dead_queue;
    let messages = eventually("the panicking message in the dead-letter queue", LIMIT, || async {
        let m = bus.drain(&dead).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    let reason = header(&messages[0].delivery.properties, ack::REASON);
    assert!(reason.starts_with("the handler panicked: injected panic"), "{reason}");
    let executor = &app.executor;
    eventually("the healthy message to be billed", LIMIT, || async {
        (executor.billing().inner.snapshot().accounts.len() == 1).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_connection_mid_stream_loses_nothing_and_bills_nothing_twice() {
    let bus = TestBus::new("cut").await;
    let fixtures = routed(&bus);
    let expected = offline(&bus.settings, &fixtures).await;
    let proxy = Proxy::start().await;
    let app = spawn_app(&bus, faulty(), Some(proxy.url.clone())).await;

    for (i, d) in fixtures.iter().enumerate() {
        bus.publish(d).await;
        if i % 10 == 5 {
            proxy.cut();
        }
    }
    let executor = &app.executor;
    eventually("the ledger to match the offline replay", LIMIT, || async {
        (executor.billing().inner.snapshot() == expected).then_some(())
    })
    .await;
    assert!(proxy.accepted.load(Ordering::SeqCst) > 1, "the consumer reconnected");
    let distinct_usage_calls = {
        let offline = Executor::new(bus.settings.clone(), faulty());
        for d in &fixtures {
            offline.handle(Delivery { body: &d.body, redelivered: false }).await;
        }
        offline.billing().hooks.usage_recorded.load(Ordering::SeqCst)
    };
    assert_eq!(executor.billing().hooks.usage_recorded.load(Ordering::SeqCst), distinct_usage_calls, "no usage twice");
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstacks_own_notifications_queue_still_receives_every_message() {
    let bus = TestBus::new("shared").await;
    // A queue bound the way every OpenStack publisher binds its default queue.
    let app = spawn_app(&bus, Ledger::in_memory(), None).await;
    let openstack_queue = bus.declare_openstack_queue().await;
    let nova_fixtures: Vec<_> = deliveries("nova-legacy")
        .into_iter()
        .filter(|d| d.exchange.as_deref() == Some("nova") && d.routing_key.as_deref() == Some("notifications.info"))
        .collect();
    for d in &nova_fixtures {
        bus.publish(d).await;
    }
    let executor = &app.executor;
    eventually("our consumer to bill the instance", LIMIT, || async {
        (executor.billing().snapshot().subscriptions.len() == 1).then_some(())
    })
    .await;
    assert_eq!(bus.depth(&openstack_queue).await as usize, nova_fixtures.len(), "nothing stolen from it");
    app.shutdown().await.unwrap();
    let _ = bus
        .channel()
        .queue_delete(openstack_queue.as_str().into(), lapin::options::QueueDeleteOptions::default())
        .await;
    bus.cleanup().await;
}

/// Starts `concertim-billing run` with its ledger in `ledger`, publishes 300 usage messages of
/// 10 vCPU-minutes each, and returns once some of them are billed.
async fn service_mid_batch(bus: &TestBus, ledger: &std::path::Path) -> std::process::Child {
    let service = service_command(bus, ledger).spawn().unwrap();
    let queue = bus.names().queue;
    eventually("the service to consume", LIMIT, || async {
        (bus.consumers(&queue).await.unwrap_or(0) > 0).then_some(())
    })
    .await;
    for d in &usage_batch(&usage_fixture(), 300) {
        bus.publish(d).await;
    }
    eventually("some messages to be billed", LIMIT, || async { (billed_test_units(ledger).await > 0).then_some(()) })
        .await;
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_batch_and_restarted_bills_every_message_exactly_once() {
    let bus = TestBus::new("sigkill").await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    let mut service = service_mid_batch(&bus, &ledger).await;
    let queue = bus.names().queue;
    signal(&service, "KILL");
    service.wait().unwrap();
    let billed_before_restart = billed_test_units(&ledger).await;

    let mut service = service_command(&bus, &ledger).spawn().unwrap();
    eventually("every message to be billed", LIMIT, || async {
        (billed_test_units(&ledger).await >= 3000 && bus.depth(&queue).await == 0).then_some(())
    })
    .await;
    signal(&service, "TERM");
    assert!(service.wait().unwrap().success());
    eprintln!("killed after {billed_before_restart} of 3000 vCPU-minutes were billed");
    assert_eq!(billed_test_units(&ledger).await, 3000, "300 messages × 10 vCPU-minutes, none twice");
    assert_eq!(bus.depth(&bus.names().dead_queue).await, 0);
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_work_in_flight_finishes_and_acks_it_then_exits_zero() {
    let bus = TestBus::new("sigterm").await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    let mut service = service_mid_batch(&bus, &ledger).await;
    let queue = bus.names().queue;
    signal(&service, "TERM");
    let status = service.wait().unwrap();
    assert_eq!(status.code(), Some(0));

    // Every message is either billed (and so acknowledged) or back in the queue, never both:
    // a message billed but not acknowledged would be counted twice here.
    let billed = billed_test_units(&ledger).await / 10;
    let waiting = u64::from(bus.depth(&queue).await);
    eprintln!("on SIGTERM: {billed} billed, {waiting} left in the queue");
    assert_eq!(billed + waiting, 300);
    bus.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_never_creates_an_upstream_exchange_it_waits_for_openstack_to_declare_it() {
    // Before, the service declared `nova` itself, with a guessed durability; Nova's own
    // declaration then failed with PRECONDITION_FAILED and its notifications were dropped.
    let bus = TestBus::new("upstream").await;
    let nova = bus.exchange("nova");
    bus.channel().exchange_delete(nova.as_str().into(), Default::default()).await.unwrap();
    let app = concertim_billing::app::App::new(bus.settings.clone(), Ledger::in_memory());
    let (executor, health) = (std::sync::Arc::clone(&app.executor), std::sync::Arc::clone(&app.health));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(app.run(shutdown.clone()));
    // It consumes what is bound, and looks for `nova` without creating it.
    eventually("the service to consume", LIMIT, || async { health.is_consuming().then_some(()) }).await;
    // A probe on a connection of its own (a failed passive declare spoils its channel).
    let probe = concertim_billing::bus::connect(&bus.settings.bus, "probe").await.unwrap();
    let channel = probe.create_channel().await.unwrap();
    let passive = lapin::options::ExchangeDeclareOptions { passive: true, ..Default::default() };
    let absent = channel
        .exchange_declare(nova.as_str().into(), lapin::ExchangeKind::Topic, passive, FieldTable::default())
        .await;
    assert!(absent.is_err(), "the service created {nova}");
    let _ = probe.close(200, "done".into()).await;
    // Nova declares it (durable, as with amqp_durable_queues = true) and publishes.
    bus.channel()
        .exchange_declare(
            nova.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let create = deliveries("nova-legacy")
        .into_iter()
        .find(|d| String::from_utf8_lossy(&d.body).contains("compute.instance.create.end"))
        .unwrap();
    // Published until the service has bound its queue (an unbound publish is dropped, and the
    // create is idempotent).
    eventually("the create billed once nova exists", LIMIT, || async {
        bus.publish(&create).await;
        (!executor.billing().snapshot().accounts.is_empty()).then_some(())
    })
    .await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    bus.cleanup().await;
}

#[tokio::test]
async fn with_several_broker_nodes_the_service_connects_to_one_that_answers() {
    // oslo's multi-host form: the first node is down (nothing listens there), the second is the
    // test broker.
    let bus = TestBus::new("nodes").await;
    let url = bus.settings.bus.url.expose().to_owned();
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, host_and_vhost) = rest.rsplit_once('@').unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cluster = format!("{scheme}://{userinfo}@{dead},{userinfo}@{host_and_vhost}");
    let app = spawn_app(&bus, Ledger::in_memory(), Some(cluster)).await;
    bus.publish(&usage_fixture()).await;
    crate::support::wait::eventually("the usage billed through the second node", Duration::from_secs(20), || async {
        (!app.executor.billing().snapshot().usage.is_empty()).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
    bus.cleanup().await;
}

// Two workers: the TLS front relays while the test waits on the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_broker_is_trusted_through_bus_tls_ca_file_and_refused_without_it_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::support::certificates(dir.path());
    let bus = TestBus::new("tls").await;
    let plain = bus.settings.bus.url.expose().to_owned();
    let (_, rest) = plain.split_once("://").unwrap();
    let (userinfo, host_and_vhost) = rest.rsplit_once('@').unwrap();
    let (host, vhost) = host_and_vhost.split_once('/').unwrap();
    let broker: std::net::SocketAddr = host.parse().unwrap();
    // As a TLS listener of RabbitMQ would: each connection decrypted and passed to the plain port.
    let port = crate::support::tls::front(std::path::Path::new(&cert), std::path::Path::new(&key), broker).await;
    let mut settings = bus.settings.bus.clone();
    settings.url = concertim_billing::config::SecretUrl::new(format!("amqps://{userinfo}@127.0.0.1:{port}/{vhost}"));

    settings.tls.ca_file = Some(ca);
    let connection = concertim_billing::bus::connect(&settings, "tls").await.expect("verified through the private CA");
    let channel = connection.create_channel().await.unwrap();
    assert!(channel.status().connected());
    connection.close(200, "done".into()).await.unwrap();

    // Without the CA, and with another CA: refused, saying which setting to fix.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = crate::support::certificates(other.path());
    for ca_file in [None, Some(other_ca)] {
        settings.tls.ca_file = ca_file;
        let refused = concertim_billing::bus::connect(&settings, "tls").await.unwrap_err();
        assert_eq!(refused.class(), concertim_billing::class::ErrorClass::Permanent);
        let refused = refused.to_string();
        assert!(refused.contains("not trusted") && refused.contains("bus.tls.ca_file"), "{refused}");
    }
    bus.cleanup().await;
}
