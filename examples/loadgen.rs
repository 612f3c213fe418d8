//! Load generator: publishes fixture-derived messages to the upstream exchanges of a fresh,
//! prefixed topology on the local RabbitMQ, runs the real consumer in this process against the
//! embedded ledger, and reports throughput, bus-to-effect latency, peak RSS and CPU time.
//!
//! ```sh
//! cargo run --release --example loadgen -- --messages 20000 --mix ignored
//! cargo run --release --example loadgen -- --messages 20000 --mix usage
//! ```
//!
//! Messages are published first (as a backlog), then consumed; throughput is the consumer's,
//! from its first to its last effect. Output: a table, and one JSON line.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use concertim_billing::{
    billing::{Applied, Billing, BillingError, Context, Ledger},
    bus::{self, topology},
    config::{Binding, Settings},
    event::{InstanceId, PlanName, ProjectId, Timestamp},
    executor::Executor,
    plan::{SubscriptionSpec, UsageSpec},
};
use lapin::{options::BasicPublishOptions, BasicProperties};
use tokio_util::sync::CancellationToken;

/// The ledger, timing each message's first effect against its notification timestamp.
struct Timed {
    ledger: Ledger,
    latencies: Mutex<Vec<Duration>>,
    first: Mutex<Option<Instant>>,
    done: AtomicUsize,
}

impl Timed {
    fn effect(&self, ctx: Context<'_>) {
        let now = time::OffsetDateTime::now_utc();
        let lag = now - ctx.meta.timestamp.as_offset();
        self.latencies.lock().unwrap().push(lag.try_into().unwrap_or_default());
        self.first.lock().unwrap().get_or_insert_with(Instant::now);
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

impl Billing for Timed {
    async fn ensure_account(&self, p: &ProjectId, ctx: Context<'_>) -> Result<Applied, BillingError> {
        self.ledger.ensure_account(p, ctx).await
    }
    async fn close_account(&self, p: &ProjectId, at: Timestamp, ctx: Context<'_>) -> Result<Applied, BillingError> {
        self.ledger.close_account(p, at, ctx).await
    }
    async fn ensure_subscription(&self, s: &SubscriptionSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        self.ledger.ensure_subscription(s, ctx).await
    }
    async fn change_plan(
        &self,
        i: &InstanceId,
        p: &PlanName,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        self.ledger.change_plan(i, p, at, ctx).await
    }
    async fn cancel_subscription(
        &self,
        i: &InstanceId,
        at: Timestamp,
        ctx: Context<'_>,
    ) -> Result<Applied, BillingError> {
        self.ledger.cancel_subscription(i, at, ctx).await
    }
    async fn record_usage(&self, u: &UsageSpec, ctx: Context<'_>) -> Result<Applied, BillingError> {
        let applied = self.ledger.record_usage(u, ctx).await;
        self.effect(ctx);
        applied
    }
}

fn now_oslo() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// An oslo 2.0 envelope; `usage` ones carry one vCPU sample of one of 1,000 instances in 100
/// projects, the others an event type nobody handles.
fn message(i: usize, usage: bool) -> Vec<u8> {
    let payload = if usage {
        serde_json::json!([{
            "counter_name": "vcpus", "counter_type": "gauge", "counter_unit": "vcpu", "counter_volume": 2,
            "project_id": format!("project-{:03}", i % 100), "resource_id": format!("instance-{:04}", i % 1000),
            "timestamp": "2025-03-03T09:10:00+00:00",
            "resource_metadata": {"flavor_name": "m1.small", "launched_at": "2025-03-03T09:00:00"}
        }])
    } else {
        serde_json::json!({"id": format!("image-{i}"), "status": "active"})
    };
    let event_type = if usage { "metering" } else { "image.update" };
    let inner = serde_json::json!({"message_id": format!("load-{i}"), "event_type": event_type, "publisher_id": "loadgen",
        "priority": "INFO", "timestamp": now_oslo(), "payload": payload});
    serde_json::to_vec(&serde_json::json!({"oslo.version": "2.0", "oslo.message": inner.to_string()})).unwrap()
}

fn proc_value(path: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, rest)| rest.split(' ').collect()).unwrap_or_default();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_owned())
    };
    let count: usize = arg("--messages", "20000").parse().expect("--messages N");
    let mix = arg("--mix", "usage");
    let usage = match mix.as_str() {
        "usage" => true,
        "ignored" => false,
        other => panic!("--mix usage|ignored, not {other}"),
    };

    let prefix = format!("loadgen-{}-", std::process::id());
    let mut settings = Settings::embedded();
    settings.bus.prefix = prefix.clone();
    settings.bus.bindings = vec![
        Binding { exchange: format!("{prefix}ceilometer"), routing_key: "metering.sample".into() },
        Binding { exchange: format!("{prefix}glance"), routing_key: "notifications.info".into() },
    ];
    settings.bus.prefetch = arg("--prefetch", "256").parse().unwrap();
    settings.bus.lanes = arg("--lanes", "8").parse().unwrap();
    let connection = bus::connect(&settings.bus.url, "loadgen").await.expect("RabbitMQ at 127.0.0.1:5672");
    let channel = connection.create_channel().await.unwrap();
    let names = topology::declare(&channel, &settings.bus).await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();

    let (exchange, key) = if usage {
        (format!("{prefix}ceilometer"), "metering.sample")
    } else {
        (format!("{prefix}glance"), "notifications.info")
    };
    let published = Instant::now();
    let mut confirms = Vec::with_capacity(1000);
    for i in 0..count {
        let body = message(i, usage);
        let props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        confirms.push(
            channel
                .basic_publish(exchange.as_str().into(), key.into(), BasicPublishOptions::default(), &body, props)
                .await
                .unwrap(),
        );
        if confirms.len() == 1000 {
            for c in confirms.drain(..) {
                c.await.unwrap();
            }
        }
    }
    for c in confirms.drain(..) {
        c.await.unwrap();
    }
    let publish_rate = count as f64 / published.elapsed().as_secs_f64();

    let timed = Timed {
        ledger: Ledger::in_memory(),
        latencies: Mutex::new(Vec::new()),
        first: Mutex::new(None),
        done: AtomicUsize::new(0),
    };
    let executor = Arc::new(Executor::new(settings.clone(), timed));
    let shutdown = CancellationToken::new();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let consumer = tokio::spawn({
        let executor = Arc::clone(&executor);
        let shutdown = shutdown.clone();
        let bus = settings.bus.clone();
        async move { bus::run(&bus, executor, shutdown).await }
    });
    // Done when the queue is empty and nothing is unacknowledged.
    let check = connection.create_channel().await.unwrap();
    loop {
        let q = check
            .queue_declare(
                names.queue.as_str().into(),
                lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                Default::default(),
            )
            .await
            .unwrap();
        let billed = executor.billing().done.load(Ordering::Relaxed);
        if q.message_count() == 0 && (!usage || billed >= count) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    consumer.await.unwrap().unwrap();
    let cpu = cpu_seconds() - cpu_before;

    let mut lat = executor.billing().latencies.lock().unwrap().clone();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let rss_kb = proc_value("/proc/self/status", "VmHWM:").unwrap_or(0);
    let rate = count as f64 / elapsed.as_secs_f64();
    println!("mix {mix}: {count} messages, prefetch {}, lanes {}", settings.bus.prefetch, settings.bus.lanes);
    println!("  published (confirmed)   {publish_rate:>10.0} msg/s");
    println!("  consumed, effects, acks {rate:>10.0} msg/s  ({:.2} s)", elapsed.as_secs_f64());
    println!("  CPU                     {:>10.3} s per 1,000 messages", cpu / count as f64 * 1000.0);
    println!("  peak RSS                {:>10.1} MiB", rss_kb as f64 / 1024.0);
    if usage {
        println!(
            "  publish-to-effect (backlog) p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    }
    println!(
        "{}",
        serde_json::json!({"mix": mix, "messages": count, "publish_per_s": publish_rate.round(), "consume_per_s": rate.round(),
            "cpu_s_per_1000": cpu / count as f64 * 1000.0, "peak_rss_mib": rss_kb as f64 / 1024.0,
            "lag_ms_p50": pct(0.5), "lag_ms_p99": pct(0.99), "lag_ms_max": pct(1.0)})
    );
    for q in [&names.queue, &names.retry_queue, &names.dead_queue] {
        let _ = channel.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for e in [names.retry_exchange, names.dead_exchange, format!("{prefix}ceilometer"), format!("{prefix}glance")] {
        let _ = channel.exchange_delete(e.as_str().into(), Default::default()).await;
    }
}
