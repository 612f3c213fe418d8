//! OpenStack's own publishing code as a peer: oslo.messaging's Notifier (Python, from PyPI,
//! installed by `deploy/dev/test.sh` into `target/dev/oslo-venv`) publishes the Nova lifecycle
//! fixtures as Nova would, with oslo's defaults and with durable and quorum queues, and with
//! either side starting first. The publisher never fails (the service never declares Nova's
//! exchange with another durability), and the service bills what it sent.
//!
//! Each case has a vhost of its own: oslo declares its `notifications.info` queue under that
//! fixed name, with the durability of its configuration.

use std::{io::Write, path::PathBuf, process::Stdio, time::Duration};

use concertim_billing::{billing::Ledger, fixture::FixtureDelivery};
use serde_json::{json, Value};

use crate::support::{
    bus::{spawn_app, TestBus},
    deliveries, rabbitmqctl,
    wait::eventually,
};

const LIMIT: Duration = Duration::from_secs(60);

/// The Python with oslo.messaging: `CONCERTIM_BILLING_OSLO_PYTHON`, as `deploy/dev/test.sh`
/// sets it. Without it the test says it skipped, unless `CONCERTIM_BILLING_REQUIRE_OSLO` is set.
fn python() -> Option<PathBuf> {
    match std::env::var_os("CONCERTIM_BILLING_OSLO_PYTHON") {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => {
            assert!(
                std::env::var_os("CONCERTIM_BILLING_REQUIRE_OSLO").is_none(),
                "CONCERTIM_BILLING_REQUIRE_OSLO is set but CONCERTIM_BILLING_OSLO_PYTHON is not (deploy/dev/test.sh sets it)"
            );
            eprintln!("skipped: no oslo.messaging (CONCERTIM_BILLING_OSLO_PYTHON); deploy/dev/test.sh installs it");
            None
        }
    }
}

/// A fixture as the Notifier takes it: event type, priority, payload, publisher.
fn notification(d: &FixtureDelivery) -> Value {
    let envelope: Value = serde_json::from_slice(&d.body).unwrap();
    let message: Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    json!({"event_type": message["event_type"], "priority": message["priority"],
           "payload": message["payload"], "publisher_id": message["publisher_id"]})
}

/// Runs the Notifier with `notifications` on stdin; panics when it fails to publish.
fn notify(python: &PathBuf, vhost: &str, exchange: &str, options: &[&str], notifications: &[Value]) {
    let script = crate::support::root().join("tests/support/oslo_notify.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .args(["--url", &format!("rabbit://guest:guest@127.0.0.1:5672/{vhost}"), "--exchange", exchange])
        .args(options)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for n in notifications {
        writeln!(stdin, "{n}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "oslo.messaging failed to publish:\n{}", String::from_utf8_lossy(&out.stderr));
}

async fn case(name: &str, service_first: bool, options: &[&str]) {
    let Some(python) = python() else { return };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let vhost = format!("oslo-{name}-{}-{nanos}", std::process::id());
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let bus = TestBus::new(name).await;
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let exchange = bus.exchange("nova");
    let lifecycle: Vec<FixtureDelivery> =
        deliveries("nova-legacy").into_iter().filter(|d| d.exchange.as_deref() == Some("nova")).collect();
    let warm_up = [json!({"event_type": "compute.instance.update", "priority": "INFO",
        "payload": {"state": "building"}, "publisher_id": "compute.host-0"})];

    let app = if service_first {
        // The service first: it consumes, finds no `nova`, and waits without creating it; Nova
        // then declares its exchange as its configuration says.
        let app = spawn_app(&bus, Ledger::in_memory(), Some(url.clone())).await;
        notify(&python, &vhost, &exchange, options, &warm_up);
        app
    } else {
        notify(&python, &vhost, &exchange, options, &warm_up);
        spawn_app(&bus, Ledger::in_memory(), Some(url.clone())).await
    };
    let queue = bus.names().queue;
    eventually("the service's queue bound to Nova's exchange", LIMIT, || async {
        let bindings =
            rabbitmqctl(&["list_bindings", "-p", &vhost, "-q", "source_name", "destination_name", "routing_key"]);
        bindings.lines().any(|l| l == format!("{exchange}\t{queue}\tnotifications.info")).then_some(())
    })
    .await;
    let notifications: Vec<Value> = lifecycle.iter().map(notification).collect();
    notify(&python, &vhost, &exchange, options, &notifications);

    // What an offline replay of the same fixtures bills, with the same settings.
    let offline = concertim_billing::executor::Executor::new(bus.settings.clone(), Ledger::in_memory());
    for d in &lifecycle {
        offline.handle(concertim_billing::executor::Delivery { body: &d.body, redelivered: false }).await;
    }
    let expected = offline.billing().snapshot();
    let executor = &app.executor;
    eventually("the lifecycle billed as the offline replay bills it", LIMIT, || async {
        let got = executor.billing().snapshot();
        (got.subscriptions == expected.subscriptions && got.accounts == expected.accounts).then_some(())
    })
    .await;
    let got = executor.billing().snapshot();
    assert_eq!((&got.accounts, &got.subscriptions), (&expected.accounts, &expected.subscriptions));
    app.shutdown().await.unwrap();
    bus.cleanup().await;
    rabbitmqctl(&["delete_vhost", &vhost]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oslo_defaults_with_the_service_started_first_bill_the_lifecycle_and_nova_publishes_fine() {
    case("oslo-defaults", true, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_queues_with_the_service_started_first_bill_the_lifecycle_and_nova_publishes_fine() {
    // Before, the service declared `nova` non-durable first and every durable publish of Nova
    // failed with PRECONDITION_FAILED.
    case("oslo-durable", true, &["--durable"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_with_nova_started_first_bill_the_lifecycle() {
    case("oslo-quorum", false, &["--durable", "--quorum"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_deleted_exchanges_with_the_service_started_first_bill_the_lifecycle_and_nova_publishes_fine() {
    // Before, the service declared `nova` without auto-delete, and its advice for Nova's
    // PRECONDITION_FAILED was to change the durability, which does not help.
    case("oslo-autodelete", true, &["--auto-delete"]).await;
}
