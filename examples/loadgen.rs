//! Load generator: publishes fixture-derived messages to the upstream exchanges of a fresh,
//! prefixed topology on the local RabbitMQ, runs the real consumer in this process against the
//! embedded ledger or the fake KillBill of `tests/support/killbill/`, and reports throughput,
//! bus-to-effect latency, peak RSS and CPU time, as a table and as one JSON line.
//!
//! ```sh
//! cargo run --release --example loadgen -- --messages 20000 --mix ignored
//! cargo run --release --example loadgen -- --messages 20000 --mix usage
//! cargo run --release --example loadgen -- --messages 20000 --rate 1000
//! cargo run --release --example loadgen -- --messages 20000 --backend killbill --latency-ms 2
//! cargo run --release --example loadgen -- --messages 5000 --backend killbill --killbill-url http://127.0.0.1:18080
//! cargo run --release --example loadgen -- --messages 100000 --prefetch 1000
//! cargo run --release --example loadgen -- --side-by-side --messages 100000
//! ```
//!
//! `benches/run-all.sh` runs every measurement the README reports.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use concertim_billing::{
    app::App,
    billing::{
        hooks::{Call, Hooked, Hooks},
        Applied, Billing, BillingError, Context, KillBill, Ledger,
    },
    bus::{self, topology},
    config::{Binding, Settings},
    executor::{Delivery, Outcome},
    fixture,
};
use lapin::{options::BasicPublishOptions, BasicProperties, Channel};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The contract-faithful fake KillBill of the integration tests, served from this process.
#[allow(dead_code)]
#[path = "../tests/support/killbill/mod.rs"]
mod fake_killbill;

/// What the fake KillBill is served with (its port and its fault layer).
#[allow(dead_code)]
#[path = "../tests/support/fake_server.rs"]
mod fake_server;

/// Measures the consumer through the real broker: throughput, bus-to-effect latency, peak RSS
/// and CPU time per 1,000 messages.
///
/// Without `--rate`, the messages are published first (a backlog) and then consumed as fast
/// as possible: that measures throughput. With `--rate N`, they are published at N messages/s
/// while the consumer runs: that measures latency, from the notification's timestamp (set when
/// it is published, to the microsecond) to its billing effect.
///
/// `--side-by-side` measures the service against what the broker allows, in one run: the same
/// backlog drained by a bare lapin consumer acking every 64th message with `multiple`, on a
/// quorum queue declared as the service declares its own, then by the service (the ignored
/// mix, then the usage mix into the ledger), then the usage mix published at `--rate` (1,000/s
/// unless given) for its bus-to-effect percentiles; and prints the ratios.
#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen")]
struct Args {
    /// Messages to publish (each with a unique message id).
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// What they are.
    #[arg(long, value_enum, default_value_t = Mix::Usage)]
    mix: Mix,
    /// Publish at this many messages/s while consuming (0: publish a backlog first).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Where billing goes.
    #[arg(long, value_enum, default_value_t = BackendKind::Ledger)]
    backend: BackendKind,
    /// Every answer of the fake KillBill waits this long (a server's latency).
    #[arg(long, default_value_t = 2)]
    latency_ms: u64,
    /// With `--backend killbill`: a real KillBill (as `deploy/dev/killbill.sh` runs it,
    /// admin/password, release 0.22) instead of the fake. A fresh tenant is bootstrapped with the
    /// bundled catalog. Requests are not counted there: in the usage mix's steady state each
    /// notification is one request.
    #[arg(long)]
    killbill_url: Option<String>,
    /// `bus.prefetch`: unacknowledged messages the broker hands over at once [default: the
    /// service's default].
    #[arg(long)]
    prefetch: Option<u16>,
    /// `bus.lanes`: projects handled concurrently [default: the service's default].
    #[arg(long)]
    lanes: Option<usize>,
    /// `bus.shards`: 0 for one queue; N for the sharded topology (the intake moves every
    /// message to one of N shard queues; needs the rabbitmq_consistent_hash_exchange plugin).
    #[arg(long, default_value_t = 0)]
    shards: u16,
    /// Projects the messages spread over (each project is one lane's worth of order).
    #[arg(long, default_value_t = 100)]
    projects: usize,
    /// Install a metrics recorder, and serve `/metrics` as the service does (on 127.0.0.1, a
    /// free port) for `--scrapers`.
    #[arg(long, value_enum, default_value_t = MetricsMode::Off)]
    metrics: MetricsMode,
    /// Sample the resident memory every this many seconds while consuming (0: never), to see
    /// whether it stays flat over a long run.
    #[arg(long, default_value_t = 0)]
    rss_every_s: u64,
    /// Clients requesting `/metrics` back to back while the consumer runs (a scrape flood).
    #[arg(long, default_value_t = 0)]
    scrapers: usize,
    /// Instances the usage messages spread over.
    #[arg(long, default_value_t = 1_000)]
    instances: usize,
    /// The bare consumer, the ignored and usage backlogs and a steady rate, one after the
    /// other, with the ratios (see above). `--mix`, `--backend` and `--shards` are not used.
    #[arg(long)]
    side_by_side: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mix {
    /// An event type nobody handles (`image.update`): decode, ignore, acknowledge.
    Ignored,
    /// Ceilometer `metering` of known instances: gauge samples (the instance's evidence, facts
    /// in the state store) and one sample of a delta meter; after a warm-up that creates their
    /// accounts and subscriptions, one usage record (one KillBill request) per notification.
    Usage,
    /// Legacy Nova `compute.instance.create.end` of new instances: the create path (account
    /// once per project, then subscription, custom fields, account state: several requests).
    Lifecycle,
    /// Keystone `identity.project.created` of one project, again and again: billed (the
    /// account is ensured, and its latency recorded in the metrics) while neither the ledger
    /// nor this tool keeps anything per message, so resident memory shows what the service
    /// itself keeps.
    Project,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MetricsMode {
    /// No metrics recorder (the figures above).
    Off,
    /// The service's recorder, as `run` installs it: its upkeep folds samples in every 5 s.
    On,
    /// A recorder without upkeep, as the service had before: histogram samples pile up until a
    /// scrape.
    NoUpkeep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// The embedded in-memory ledger.
    Ledger,
    /// The real KillBill client against the fake KillBill, in this process.
    Killbill,
}

/// Times each message's effect against its notification timestamp. The effect is the usage
/// record (`usage`) or the subscription (`lifecycle`).
struct Timing {
    mix: Mix,
    latencies: Mutex<Vec<Duration>>,
    done: AtomicUsize,
}

impl Timing {
    fn new(mix: Mix) -> Self {
        Self { mix, latencies: Mutex::new(Vec::new()), done: AtomicUsize::new(0) }
    }

    fn effect(&self, ctx: Context<'_>) {
        // The project mix measures memory: nothing is kept per message.
        if self.mix != Mix::Project {
            let lag = time::OffsetDateTime::now_utc() - ctx.meta.timestamp.as_offset();
            self.latencies.lock().unwrap().push(lag.try_into().unwrap_or_default());
        }
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    fn reset(&self) {
        self.latencies.lock().unwrap().clear();
        self.done.store(0, Ordering::Relaxed);
    }
}

impl Hooks for Timing {
    fn after(&self, call: Call<'_>, ctx: Context<'_>, _: &Result<Applied, BillingError>) {
        let measured = match call {
            Call::EnsureAccount(_) => Mix::Project,
            Call::EnsureSubscription(_) => Mix::Lifecycle,
            Call::RecordUsage(_) => Mix::Usage,
            _ => return,
        };
        if self.mix == measured {
            self.effect(ctx);
        }
    }
}

/// The oslo envelope timestamp of now, with microseconds.
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

/// The metered (delta) meter of the usage mix: one sample of it in each message is one usage
/// record.
const USAGE_METER: &str = "loadgen.usage";

/// Messages made from a fixture of `fixtures/nova-legacy`, with fresh ids.
struct Generator {
    mix: Mix,
    /// The fixture's inner oslo message.
    template: Value,
    exchange: String,
    routing_key: String,
    projects: usize,
    instances: usize,
}

impl Generator {
    fn new(mix: Mix, prefix: &str, projects: usize, instances: usize) -> Self {
        let dir = if mix == Mix::Project { "fixtures/keystone" } else { "fixtures/nova-legacy" };
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let files = fixture::collect_files(&[root]).expect("fixtures/nova-legacy is readable");
        let needle = match mix {
            Mix::Usage => "\\\"event_type\\\": \\\"metering\\\"",
            Mix::Lifecycle => "\\\"event_type\\\": \\\"compute.instance.create.end\\\"",
            Mix::Project => "\\\"event_type\\\": \\\"identity.project.created\\\"",
            // The ignored mix reuses a Nova payload under an event type nobody handles.
            Mix::Ignored => "\\\"event_type\\\": \\\"compute.instance.create.start\\\"",
        };
        let body = fixture::read_all(&files)
            .into_iter()
            .filter_map(|(_, d)| d.ok())
            .find(|d| String::from_utf8_lossy(&d.body).contains(needle))
            .expect("the fixture exists")
            .body;
        let envelope: Value = serde_json::from_slice(&body).unwrap();
        let template: Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
        let (exchange, routing_key) = match mix {
            Mix::Usage => ("ceilometer", "metering.sample"),
            Mix::Lifecycle => ("nova", "notifications.info"),
            Mix::Project => ("keystone", "notifications.info"),
            Mix::Ignored => ("glance", "notifications.info"),
        };
        Self {
            mix,
            template,
            exchange: format!("{prefix}{exchange}"),
            routing_key: routing_key.to_owned(),
            projects,
            instances,
        }
    }

    /// The `i`th message's body, its timestamp now. Instance `n` always belongs to the same
    /// project, so usage matches the subscriptions the warm-up created.
    fn body(&self, id: &str, i: usize) -> Vec<u8> {
        let mut m = self.template.clone();
        let instance_no = if self.mix == Mix::Lifecycle { i } else { i % self.instances };
        let instance = format!("00000000-0000-4000-8000-{instance_no:012x}");
        let project = format!("{:032x}", instance_no % self.projects);
        m["message_id"] = id.into();
        m["timestamp"] = now_oslo().into();
        match self.mix {
            Mix::Usage => {
                // Samples dated now, as Ceilometer sends them: one far from its notification's
                // timestamp is invalid.
                let now = now_oslo();
                let samples = m["payload"].as_array_mut().unwrap();
                for sample in samples.iter_mut() {
                    sample["project_id"] = project.as_str().into();
                    sample["resource_id"] = instance.as_str().into();
                    sample["timestamp"] = now.as_str().into();
                }
                // The gauge samples are evidence of the instance (state store facts); one
                // delta sample of a metered meter is usage, recorded in the backend.
                let mut usage = samples[0].clone();
                usage["counter_name"] = USAGE_METER.into();
                usage["counter_type"] = "delta".into();
                usage["counter_volume"] = 1.into();
                usage["counter_unit"] = "unit".into();
                usage["message_id"] = format!("{id}-usage").into();
                samples.push(usage);
            }
            Mix::Lifecycle => {
                m["payload"]["tenant_id"] = project.into();
                m["payload"]["instance_id"] = instance.into();
            }
            Mix::Ignored => m["event_type"] = "image.update".into(),
            Mix::Project => {}
        }
        serde_json::to_vec(&serde_json::json!({"oslo.version": "2.0", "oslo.message": m.to_string()})).unwrap()
    }
}

fn proc_value(path: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU seconds of this process (the consumer, and the fake when there is one).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, rest)| rest.split(' ').collect()).unwrap_or_default();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// Publishes `range` with publisher confirms, at `rate` messages/s or as fast as the broker
/// confirms (0).
async fn publish(channel: &Channel, generator: &Generator, range: std::ops::Range<usize>, rate: u32) {
    let started = Instant::now();
    let first = range.start;
    let mut confirms = Vec::with_capacity(1000);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut i = range.start;
    while i < range.end {
        let due = if rate == 0 {
            range.end
        } else {
            tick.tick().await;
            (first + (started.elapsed().as_secs_f64() * f64::from(rate)) as usize).min(range.end)
        };
        while i < due {
            let body = generator.body(&format!("load-{i}"), i);
            let props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
            let confirm = channel
                .basic_publish(
                    generator.exchange.as_str().into(),
                    generator.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await
                .expect("the broker takes the message");
            confirms.push(confirm);
            if confirms.len() == 1000 {
                for c in confirms.drain(..) {
                    c.await.expect("the broker confirms");
                }
            }
            i += 1;
        }
    }
    for c in confirms.drain(..) {
        c.await.expect("the broker confirms");
    }
}

/// The fake KillBill, when it is the backend.
type Fake = Option<fake_killbill::FakeKillBill>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    if args.side_by_side {
        side_by_side(&args).await;
        return;
    }
    let metrics = match args.metrics {
        MetricsMode::Off => None,
        MetricsMode::On => concertim_billing::telemetry::install_prometheus(),
        MetricsMode::NoUpkeep => {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&concertim_billing::telemetry::LAG_BUCKETS)
                .expect("buckets")
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).expect("the only recorder");
            Some(handle)
        }
    };
    measure(&args, &format!("loadgen-{}-", std::process::id()), metrics).await;
}

/// The service's settings for a run: a topology of its own under `prefix`.
fn settings_for(args: &Args, prefix: &str) -> Settings {
    let mut settings = Settings::embedded();
    settings.bus.prefix = prefix.to_owned();
    settings.bus.bindings = ["ceilometer", "nova", "glance", "keystone"]
        .into_iter()
        .map(|e| Binding {
            exchange: format!("{prefix}{e}"),
            routing_key: if e == "ceilometer" { "metering.sample" } else { "notifications.info" }.into(),
        })
        .collect();
    settings.bus.prefetch = args.prefetch.unwrap_or(settings.bus.prefetch);
    settings.bus.lanes = args.lanes.unwrap_or(settings.bus.lanes);
    settings.bus.shards = args.shards;
    settings.billing.meters.insert(
        USAGE_METER.to_owned(),
        concertim_billing::config::MeterRule {
            unit: concertim_billing::event::Unit::parse("openstack-billed-vcpus").expect("a unit of the catalog"),
            factor: concertim_billing::config::Factor::ONE,
            counter: concertim_billing::config::Counter::Delta,
            resource: concertim_billing::event::ResourceKind::Instance,
        },
    );
    settings
}

/// One measurement, as the flags say.
async fn measure(
    args: &Args,
    prefix: &str,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Measured {
    let settings = settings_for(args, prefix);
    match args.backend {
        BackendKind::Ledger => run(args, settings, Ledger::in_memory(), None, metrics).await,
        BackendKind::Killbill if args.killbill_url.is_some() => {
            let url = args.killbill_url.clone().unwrap_or_default();
            let tenant = format!("loadgen-{}", std::process::id());
            let kb = concertim_billing::config::KillBillSettings {
                url: url.clone(),
                username: "admin".into(),
                password: concertim_billing::config::Secret::new("password"),
                api_key: tenant.clone(),
                api_secret: concertim_billing::config::Secret::new(format!("{tenant}-secret")),
                created_by: "loadgen".into(),
                currency: "USD".into(),
                ca_file: None,
                timeout_ms: 60_000,
                connect_timeout_ms: 3_000,
                // One idle connection per lane, so every lane keeps its connection alive.
                pool_max_idle: settings.bus.lanes,
                server_version: concertim_billing::config::KillBillVersion::V0_22,
            };
            let client = KillBill::new(kb).expect("an HTTP client");
            client
                .bootstrap(concertim_billing::billing::killbill::CATALOG_XML, "loadgen")
                .await
                .unwrap_or_else(|e| panic!("cannot bootstrap a tenant on the KillBill at {url}: {e}"));
            run(args, settings, client, None, metrics).await
        }
        BackendKind::Killbill => {
            let fake = fake_killbill::FakeKillBill::start().await;
            let mut kb = fake.settings();
            // One idle connection per lane, so every lane keeps its connection alive.
            kb.pool_max_idle = settings.bus.lanes;
            let client = KillBill::new(kb).expect("an HTTP client");
            run(args, settings, client, Some(fake), metrics).await
        }
    }
}

async fn run<B: Billing + 'static>(
    args: &Args,
    settings: Settings,
    billing: B,
    fake: Fake,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Measured {
    let generator = Generator::new(args.mix, &settings.bus.prefix, args.projects, args.instances);
    let connection = bus::connect(&settings.bus, "loadgen").await.expect("RabbitMQ at 127.0.0.1:5672");
    let channel = connection.create_channel().await.unwrap();
    // The upstream exchanges, as OpenStack's publishers declare them (the service only checks).
    for binding in &settings.bus.bindings {
        let options =
            lapin::options::ExchangeDeclareOptions { durable: settings.bus.upstream_durable, ..Default::default() };
        channel
            .exchange_declare(binding.exchange.as_str().into(), lapin::ExchangeKind::Topic, options, Default::default())
            .await
            .unwrap();
    }
    let names = topology::declare(&channel, &settings.bus).await.unwrap();
    assert!(topology::bind_upstream(&settings.bus).await.unwrap().is_empty(), "every upstream exchange is declared");
    channel.confirm_select(Default::default()).await.unwrap();
    let app = App::new(settings.clone(), Hooked { inner: Arc::new(billing), hooks: Timing::new(args.mix) });
    let executor = Arc::clone(&app.executor);

    // Warm-up: every usage instance gets its account and subscription (and the client learns
    // their ids), so the measured steady state is one usage record per notification.
    if args.mix == Mix::Usage {
        for i in 0..args.instances.min(args.messages) {
            let body = generator.body(&format!("warm-{i}"), i);
            let outcome = executor.handle(Delivery { body: &body, redelivered: false }).await;
            assert!(matches!(outcome, Outcome::Processed { .. }), "warm-up: {outcome:?}");
        }
        executor.billing().hooks.reset();
    }
    if let Some(fake) = &fake {
        fake.set_latency(Duration::from_millis(args.latency_ms));
    }
    let requests_before = fake.as_ref().map_or(0, fake_killbill::FakeKillBill::requests);

    let count = args.messages;
    let mut publish_rate = None;
    if args.rate == 0 {
        let published = Instant::now();
        publish(&channel, &generator, 0..count, 0).await;
        publish_rate = Some(count as f64 / published.elapsed().as_secs_f64());
    }

    // What the backlog's publishing left resident, before the consumer starts.
    let rss_published_kb = proc_value("/proc/self/status", "VmRSS:").unwrap_or(0);
    let shutdown = CancellationToken::new();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    // `/metrics` served as the service serves it, and flooded by `--scrapers` clients.
    let scrapes = Arc::new(AtomicUsize::new(0));
    let mut app = app;
    if let Some(handle) = metrics {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port for /metrics");
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        app = app.with_http(listener, Some(handle), "loadgen".into());
        for _ in 0..args.scrapers {
            let (url, scrapes, stop) = (url.clone(), Arc::clone(&scrapes), shutdown.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !stop.is_cancelled() {
                    if let Ok(response) = client.get(&url).send().await {
                        if response.bytes().await.is_ok() {
                            scrapes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    }
    let consumer = tokio::spawn(app.run(shutdown.clone()));
    let rss_samples = Arc::new(Mutex::new(Vec::new()));
    if args.rss_every_s > 0 {
        let (samples, stop, every) = (Arc::clone(&rss_samples), shutdown.clone(), args.rss_every_s);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(every));
            tick.tick().await;
            while !stop.is_cancelled() {
                tick.tick().await;
                let rss = proc_value("/proc/self/status", "VmRSS:").unwrap_or(0) as f64 / 1024.0;
                eprintln!("  RSS at {:>5} s: {rss:.1} MiB", samples.lock().unwrap().len() as u64 * every + every);
                samples.lock().unwrap().push((rss * 10.0).round() / 10.0);
            }
        });
    }
    let publisher = (args.rate > 0).then(|| {
        let channel = channel.clone();
        let rate = args.rate;
        tokio::spawn(async move { publish(&channel, &generator, 0..count, rate).await })
    });
    // Done when every message had its effect, nothing is queued and nothing is unacknowledged.
    let mut check = connection.create_channel().await.unwrap();
    let (mut progress, mut progressed) = (usize::MAX, Instant::now());
    let queues: Vec<String> =
        std::iter::once(names.queue.clone()).chain(topology::shard_queues(&settings.bus)).collect();
    loop {
        let mut queued = Some(0);
        for queue in &queues {
            let declared = check
                .queue_declare(
                    queue.as_str().into(),
                    lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
                    Default::default(),
                )
                .await;
            match declared {
                Ok(q) => queued = queued.map(|n| n + q.message_count()),
                Err(e) => {
                    // The broker closes a channel on any error; a fresh one asks again.
                    eprintln!("checking the queue failed ({e}); asking again on a new channel");
                    check = connection.create_channel().await.expect("a channel to check the queue");
                    queued = None;
                    break;
                }
            }
        }
        let Some(queued) = queued else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let effects = executor.billing().hooks.done.load(Ordering::Relaxed);
        let published = publisher.as_ref().is_none_or(tokio::task::JoinHandle::is_finished);
        if published && queued == 0 && (args.mix == Mix::Ignored || effects >= count) {
            break;
        }
        if effects != progress {
            (progress, progressed) = (effects, Instant::now());
        } else if progressed.elapsed() > Duration::from_secs(30) && queued == 0 {
            eprintln!("stalled: {effects} of {count} messages had their effect (see the dead-letter queue)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Every message taken: the shutdown finishes what is in flight and sends the last
    // acknowledgements, and the run ends when it has.
    shutdown.cancel();
    consumer.await.unwrap().unwrap();
    let elapsed = started.elapsed();
    if let Some(publisher) = publisher {
        publisher.await.unwrap();
    }
    let cpu = cpu_seconds() - cpu_before;
    let scraped = scrapes.load(Ordering::Relaxed);
    let rss_after_kb = proc_value("/proc/self/status", "VmRSS:").unwrap_or(0);
    let requests = fake.as_ref().map_or(0, fake_killbill::FakeKillBill::requests) - requests_before;
    if let Some(fake) = &fake {
        assert!(fake.violations().is_empty(), "bodies the OpenAPI spec rejects: {:?}", fake.violations());
    }

    let mut lat = executor.billing().hooks.latencies.lock().unwrap().clone();
    lat.sort();
    // Milliseconds, to the microsecond.
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| (d.as_secs_f64() * 1e6).round() / 1000.0)
    };
    let rss_kb = proc_value("/proc/self/status", "VmHWM:").unwrap_or(0);
    let rate = count as f64 / elapsed.as_secs_f64();
    let backend = match args.backend {
        BackendKind::Ledger => "ledger".to_owned(),
        BackendKind::Killbill => match &args.killbill_url {
            Some(url) => format!("real killbill at {url}"),
            None => format!("killbill ({} ms per request)", args.latency_ms),
        },
    };
    let mode = if args.rate == 0 { "backlog".to_owned() } else { format!("{}/s", args.rate) };
    let mix = format!("{:?}", args.mix).to_lowercase();
    println!(
        "mix {mix}, {backend}, {mode}: {count} messages, prefetch {}, lanes {}, shards {}",
        settings.bus.prefetch, settings.bus.lanes, settings.bus.shards
    );
    if let Some(p) = publish_rate {
        println!("  published (confirmed)   {p:>10.0} msg/s");
    }
    println!("  consumed, effects, acks {rate:>10.0} msg/s  ({:.2} s)", elapsed.as_secs_f64());
    if fake.is_some() {
        println!("  KillBill requests       {:>10.0} req/s  ({requests})", requests as f64 / elapsed.as_secs_f64());
    }
    println!("  CPU                     {:>10.3} s per 1,000 messages", cpu / count as f64 * 1000.0);
    println!(
        "  peak RSS                {:>10.1} MiB  ({:.1} MiB resident before consuming)",
        rss_kb as f64 / 1024.0,
        rss_published_kb as f64 / 1024.0
    );
    println!("  RSS after consuming     {:>10.1} MiB", rss_after_kb as f64 / 1024.0);
    if args.scrapers > 0 {
        println!("  /metrics scrapes        {:>10.0} req/s  ({scraped})", scraped as f64 / elapsed.as_secs_f64());
    }
    if matches!(args.mix, Mix::Usage | Mix::Lifecycle) {
        let what = if args.rate == 0 { "publish-to-effect (backlog)" } else { "bus-to-effect" };
        println!(
            "  {what} p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(0.5),
            pct(0.95),
            pct(0.99),
            pct(1.0)
        );
    }
    println!(
        "{}",
        serde_json::json!({"mix": mix, "backend": args.backend.to_possible_value().map(|v| v.get_name().to_owned()),
            "latency_ms": (args.backend == BackendKind::Killbill && args.killbill_url.is_none()).then_some(args.latency_ms),
            "killbill_url": args.killbill_url,
            "rate": args.rate, "messages": count, "prefetch": settings.bus.prefetch, "lanes": settings.bus.lanes, "shards": settings.bus.shards,
            "publish_per_s": publish_rate.map(f64::round), "consume_per_s": rate.round(),
            "requests_per_s": fake.is_some().then(|| (requests as f64 / elapsed.as_secs_f64()).round()),
            "cpu_s_per_1000": (cpu / count as f64 * 1e6).round() / 1000.0, "peak_rss_mib": (rss_kb as f64 / 102.4).round() / 10.0,
            "rss_before_consuming_mib": (rss_published_kb as f64 / 102.4).round() / 10.0,
            "rss_after_consuming_mib": (rss_after_kb as f64 / 102.4).round() / 10.0,
            "rss_samples_mib": rss_samples.lock().unwrap().clone(),
            "metrics": args.metrics.to_possible_value().map(|v| v.get_name().to_owned()),
            "scrapes_per_s": (args.scrapers > 0).then(|| (scraped as f64 / elapsed.as_secs_f64()).round()),
            "lag_ms_p50": pct(0.5), "lag_ms_p95": pct(0.95), "lag_ms_p99": pct(0.99), "lag_ms_max": pct(1.0)})
    );
    remove_topology(&channel, &settings).await;
    Measured { consume_per_s: rate, lag_ms: [pct(0.5), pct(0.95), pct(0.99), pct(1.0)] }
}

/// What a run measured.
struct Measured {
    /// Messages consumed (effects done and acknowledged) per second.
    consume_per_s: f64,
    /// Bus-to-effect p50, p95, p99 and max, in ms (0 when not measured).
    lag_ms: [f64; 4],
}

/// Deletes a run's queues and exchanges.
async fn remove_topology(channel: &Channel, settings: &Settings) {
    let names = bus::Names::new(&settings.bus);
    for q in std::iter::once(names.queue.clone())
        .chain(topology::shard_queues(&settings.bus))
        .chain([names.retry_queue.clone(), names.dead_queue.clone()])
    {
        let _ = channel.queue_delete(q.as_str().into(), Default::default()).await;
    }
    for e in [names.retry_exchange.clone(), names.dead_exchange.clone(), topology::shard_exchange(&settings.bus)]
        .into_iter()
        .chain(settings.bus.bindings.iter().map(|b| b.exchange.clone()))
    {
        let _ = channel.exchange_delete(e.as_str().into(), Default::default()).await;
    }
}

/// A bare lapin consumer, as fast as the broker allows: the same backlog of ignored messages
/// on a quorum queue declared as the service declares its own, consumed with the service's
/// prefetch and acknowledged every 64th message with `multiple`, nothing decoded. Returns
/// messages/s, from connecting to the last acknowledgement.
async fn bare(args: &Args, prefix: &str) -> f64 {
    use futures_lite::StreamExt;
    const BATCH: usize = 64;
    let settings = settings_for(args, prefix);
    let connection = bus::connect(&settings.bus, "loadgen-bare").await.expect("RabbitMQ at 127.0.0.1:5672");
    let channel = connection.create_channel().await.unwrap();
    let names = topology::declare(&channel, &settings.bus).await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let mut generator = Generator::new(Mix::Ignored, prefix, args.projects, args.instances);
    // Straight into the queue (the default exchange), as the upstream exchange would route it.
    (generator.exchange, generator.routing_key) = (String::new(), names.queue.clone());
    let count = args.messages;
    publish(&channel, &generator, 0..count, 0).await;
    drop(connection);

    let started = Instant::now();
    let connection = bus::connect(&settings.bus, "loadgen-bare").await.expect("RabbitMQ at 127.0.0.1:5672");
    let consuming = connection.create_channel().await.unwrap();
    consuming.basic_qos(settings.bus.prefetch, Default::default()).await.unwrap();
    let mut consumer = consuming
        .basic_consume(names.queue.as_str().into(), "loadgen-bare".into(), Default::default(), Default::default())
        .await
        .unwrap();
    let mut taken = 0;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.expect("a delivery");
        taken += 1;
        if taken % BATCH == 0 || taken == count {
            delivery.acker.ack(lapin::options::BasicAckOptions { multiple: true }).await.expect("the ack is sent");
        }
        if taken == count {
            break;
        }
    }
    let _ = connection.close(200, "done".into()).await;
    let elapsed = started.elapsed();
    let rate = count as f64 / elapsed.as_secs_f64();
    println!("bare lapin consumer, acks of 64 with multiple: {count} messages");
    println!("  consumed, acks          {rate:>10.0} msg/s  ({:.2} s)", elapsed.as_secs_f64());
    let cleanup = bus::connect(&settings.bus, "loadgen-bare").await.expect("RabbitMQ").create_channel().await.unwrap();
    remove_topology(&cleanup, &settings).await;
    rate
}

/// The side-by-side run: the bare consumer, the service on the ignored and usage backlogs, and
/// the usage mix at a steady rate; then the ratios, as a table and one JSON line.
async fn side_by_side(args: &Args) {
    let pid = std::process::id();
    let bare_rate = bare(args, &format!("loadgen-{pid}-bare-")).await;
    let with = |mix: Mix, rate: u32, messages: usize| Args {
        mix,
        rate,
        messages,
        backend: BackendKind::Ledger,
        shards: 0,
        metrics: MetricsMode::Off,
        ..args.clone()
    };
    let ignored = measure(&with(Mix::Ignored, 0, args.messages), &format!("loadgen-{pid}-ignored-"), None).await;
    let usage = measure(&with(Mix::Usage, 0, args.messages), &format!("loadgen-{pid}-usage-"), None).await;
    let rate = if args.rate == 0 { 1_000 } else { args.rate };
    let steady_count = args.messages.min(20 * rate as usize);
    let steady = measure(&with(Mix::Usage, rate, steady_count), &format!("loadgen-{pid}-steady-"), None).await;
    let ratio = |r: f64| (r / bare_rate * 100.0).round() / 100.0;
    println!();
    println!("side by side, {} messages, prefetch {}:", args.messages, args.prefetch.unwrap_or(256));
    println!("| run | msg/s | × bare | target |");
    println!("| --- | --- | --- | --- |");
    println!("| bare lapin consumer, acks of 64 | {bare_rate:.0} | 1.00 | |");
    println!("| service, ignored | {:.0} | {:.2} | ≥ 0.9 |", ignored.consume_per_s, ratio(ignored.consume_per_s));
    println!(
        "| service, usage into the ledger | {:.0} | {:.2} | ≥ 0.5 |",
        usage.consume_per_s,
        ratio(usage.consume_per_s)
    );
    let [p50, p95, p99, max] = steady.lag_ms;
    println!(
        "steady {rate}/s, usage into the ledger, {steady_count} messages: bus-to-effect p50 {p50:.1} ms, p95 {p95:.1} ms, \
         p99 {p99:.1} ms (target < 10 ms), max {max:.1} ms"
    );
    println!(
        "{}",
        serde_json::json!({"side_by_side": true, "messages": args.messages, "bare_per_s": bare_rate.round(),
            "ignored_per_s": ignored.consume_per_s.round(), "ignored_ratio": ratio(ignored.consume_per_s),
            "usage_per_s": usage.consume_per_s.round(), "usage_ratio": ratio(usage.consume_per_s),
            "steady_rate": rate, "steady_messages": steady_count,
            "lag_ms_p50": p50, "lag_ms_p95": p95, "lag_ms_p99": p99, "lag_ms_max": max})
    );
}
