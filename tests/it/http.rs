//! `/healthz`, `/readyz` and `/metrics` of a running service.

use std::time::Duration;

use concertim_billing::{
    billing::Ledger,
    executor::{Delivery, Executor, Outcome},
    replay::fixture::FixtureDelivery,
};

use crate::support::{
    bus::{cli_command, eventually, signal, Proxy, TestBus},
    deliveries,
};

const LIMIT: Duration = Duration::from_secs(60);

async fn get(url: &str) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    Some((response.status().as_u16(), response.text().await.ok()?))
}

/// The sum of a counter's series with this label, from the Prometheus text.
fn counter(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_readiness_follows_the_broker() {
    let bus = TestBus::new("http").await;
    let proxy = Proxy::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.json");
    let mut service = cli_command(&bus)
        .args(["--amqp-url", &proxy.url, "run", "--ledger", ledger.to_str().unwrap()])
        .env("CONCERTIM_BILLING_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = format!("{base}/readyz");
    eventually("ready", LIMIT, || async { get(&ready).await.filter(|(s, _)| *s == 200) }).await;
    assert_eq!(get(&format!("{base}/healthz")).await.unwrap().0, 200);

    // What the fixtures should count, from an offline run.
    let fixtures: Vec<FixtureDelivery> = deliveries("").into_iter().filter(|d| bus.routes(d)).collect();
    let offline = Executor::new(bus.settings.clone(), Ledger::in_memory());
    let (mut processed, mut invalid) = (0, 0);
    for d in &fixtures {
        match offline.handle(Delivery { body: &d.body, redelivered: false }).await {
            Outcome::Processed { .. } => processed += 1,
            Outcome::Invalid(_) => invalid += 1,
            _ => {}
        }
    }
    for d in &fixtures {
        bus.publish(d).await;
    }
    let metrics = format!("{base}/metrics");
    let text = eventually("every message counted", LIMIT, || async {
        let (_, text) = get(&metrics).await?;
        (counter(&text, "concertim_billing_messages_total", "outcome=") as usize == fixtures.len()).then_some(text)
    })
    .await;
    assert_eq!(counter(&text, "concertim_billing_messages_total", "outcome=\"processed\""), processed);
    assert_eq!(counter(&text, "concertim_billing_messages_total", "outcome=\"invalid\""), invalid);
    assert_eq!(counter(&text, "concertim_billing_dead_lettered_total", "class=\"invalid\""), invalid);
    assert!(text.contains("concertim_billing_bus_to_effect_seconds"), "{text}");
    assert!(text.contains("concertim_billing_broker_connected 1"), "{text}");

    proxy.set_down(true);
    eventually("not ready while the broker is away", LIMIT, || async { get(&ready).await.filter(|(s, _)| *s == 503) })
        .await;
    proxy.set_down(false);
    eventually("ready again after reconnecting", LIMIT, || async { get(&ready).await.filter(|(s, _)| *s == 200) })
        .await;

    signal(&service, "TERM");
    assert!(service.wait().unwrap().success());
    bus.cleanup().await;
}
