//! Test support for the bus: a per-test broker namespace, `spawn_app`, a billing backend with
//! injected faults, and a TCP proxy that can cut every connection.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use concertim_billing::{
    app::App,
    billing::{
        accounts::Accounts,
        hooks::{Call, Hooked, Hooks},
        Applied, Billing, BillingError, Context, Ledger,
    },
    bus::{self, topology, BusError, Names},
    config::{Binding, SecretUrl, Settings},
    executor::Executor,
    fixture::FixtureDelivery,
    telemetry::Health,
};
use lapin::{
    message::BasicGetMessage,
    options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::{net::TcpListener, task::JoinHandle};

use super::wait::eventually;
use tokio_util::sync::CancellationToken;

/// The broker every bus test uses.
pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The metered meter the bus tests bill: a delta counter, each sample's volume in one unit, so
/// that every message of a batch is usage of its own (its sample time is its key).
pub const TEST_METER: &str = "test.usage";
/// The unit [`TEST_METER`] bills.
pub const TEST_UNIT: &str = "openstack-test-usage";

/// The billing rule of [`TEST_METER`].
pub fn test_meter() -> concertim_billing::config::MeterRule {
    concertim_billing::config::MeterRule {
        unit: concertim_billing::event::Unit::parse(TEST_UNIT).unwrap(),
        factor: concertim_billing::config::Factor::ONE,
        counter: concertim_billing::config::Counter::Delta,
        resource: concertim_billing::event::ResourceKind::Instance,
    }
}

/// The upstream exchanges and routing keys the fixtures use.
pub const UPSTREAM: [(&str, &str); 8] = [
    ("nova", "notifications.info"),
    ("nova", "versioned_notifications.info"),
    ("nova", "notifications.error"),
    ("keystone", "notifications.info"),
    ("ceilometer", "metering.sample"),
    ("ceilometer", "notifications.sample"),
    ("heat", "notifications.info"),
    ("heat", "notifications.error"),
];

/// One test's namespace on the real broker: every queue and exchange carries its prefix.
pub struct TestBus {
    /// The prefix.
    pub prefix: String,
    /// The broker's URL: [`BROKER`], or a cluster's in oslo's multi-host form.
    pub broker: String,
    /// Settings pointing at the broker with this prefix, short retry delays and small limits.
    pub settings: Settings,
    connection: Connection,
    channel: Channel,
}

impl TestBus {
    /// A fresh namespace. Panics with what to do when RabbitMQ does not answer.
    pub async fn new(test: &str) -> Self {
        Self::on(BROKER, test).await
    }

    /// A fresh namespace on the broker at `broker`: one URL, or a cluster's in oslo's
    /// multi-host form (the test's own connections go to the first node that answers).
    pub async fn on(broker: &str, test: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let prefix = format!("t-{test}-{}-{nanos}-", std::process::id());
        let connection = connect_any(broker).await.unwrap_or_else(|e| {
            let shown = SecretUrl::new(broker).redacted();
            panic!("RabbitMQ is not answering at {shown} ({e}): run deploy/dev/test.sh, which starts it")
        });
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let mut settings = Settings::embedded();
        settings.bus.url = SecretUrl::new(broker);
        settings.bus.prefix = prefix.clone();
        settings.bus.bindings = UPSTREAM
            .iter()
            .map(|(exchange, routing_key)| Binding {
                exchange: format!("{prefix}{exchange}"),
                routing_key: (*routing_key).to_owned(),
            })
            .collect();
        settings.bus.retry_delay_ms = 200;
        settings.bus.max_attempts = 3;
        settings.bus.lanes = 4;
        settings.bus.prefetch = 16;
        settings.bus.backoff.initial_ms = 5;
        settings.bus.backoff.max_ms = 20;
        settings.bus.backoff.max_elapsed_ms = 50;
        settings.bus.shutdown_deadline_ms = 20_000;
        settings.bus.reconnect_max_ms = 500;
        settings.billing.meters.insert(TEST_METER.into(), test_meter());
        // Settlement is the subject of its own tests, which ask for it; the others compare
        // what messages do.
        settings.billing.time.settle_every_s = 86_400;
        let bus = Self { prefix, broker: broker.to_owned(), settings, connection, channel };
        bus.declare_upstream().await;
        bus
    }

    /// Declares this test's upstream exchanges as OpenStack's publishers do (topic, durable as
    /// `bus.upstream_durable`): the service checks them and never creates them. Non-durable
    /// exchanges vanish with a broker restart, so a reconnect declares them again, as OpenStack
    /// does on its next publish.
    pub async fn declare_upstream(&self) {
        let options = ExchangeDeclareOptions { durable: self.settings.bus.upstream_durable, ..Default::default() };
        for exchange in ["nova", "keystone", "ceilometer", "heat", "glance", "cinder", "neutron"] {
            self.channel
                .exchange_declare(
                    self.exchange(exchange).as_str().into(),
                    ExchangeKind::Topic,
                    options,
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
    }

    /// Connects again after the broker went away (a restart closes every connection), waiting
    /// up to `limit` for it to answer.
    pub async fn reconnect(&mut self, limit: Duration) {
        let connection = eventually("the broker to accept connections again", limit, || async {
            connect_any(&self.broker).await.ok()
        })
        .await;
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        self.connection = connection;
        self.channel = channel;
        self.declare_upstream().await;
    }

    /// Our queue names.
    pub fn names(&self) -> Names {
        Names::new(&self.settings.bus)
    }

    /// The test's name for an upstream exchange.
    pub fn exchange(&self, upstream: &str) -> String {
        format!("{}{upstream}", self.prefix)
    }

    /// Whether the app's bindings carry this delivery (glance, cinder and neutron are declared,
    /// not bound: a test that wants their messages binds them).
    pub fn routes(&self, delivery: &FixtureDelivery) -> bool {
        UPSTREAM
            .iter()
            .any(|(e, k)| delivery.exchange.as_deref() == Some(*e) && delivery.routing_key.as_deref() == Some(*k))
    }

    /// Publishes a fixture to this test's copy of its upstream exchange, with confirms.
    pub async fn publish(&self, delivery: &FixtureDelivery) {
        let exchange = self.exchange(delivery.exchange.as_deref().expect("the fixture names its exchange"));
        let routing_key = delivery.routing_key.clone().unwrap_or_default();
        self.publish_raw(
            &exchange,
            &routing_key,
            &delivery.body,
            bus::publish::properties(delivery.properties.as_deref()),
        )
        .await;
    }

    /// Publishes bytes with properties, with confirms.
    pub async fn publish_raw(&self, exchange: &str, routing_key: &str, body: &[u8], properties: BasicProperties) {
        self.channel
            .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions::default(), body, properties)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Messages ready in a queue (passive declare).
    pub async fn depth(&self, queue: &str) -> u32 {
        self.inspect(queue).await.unwrap_or_else(|| panic!("queue {queue} does not exist")).message_count()
    }

    /// Consumers on a queue (passive declare), or `None` when it does not exist yet.
    pub async fn consumers(&self, queue: &str) -> Option<u32> {
        Some(self.inspect(queue).await?.consumer_count())
    }

    /// A passive declare on a connection of its own: a passive declare of a missing queue
    /// closes its channel, and lapin then refuses new channels on that connection.
    async fn inspect(&self, queue: &str) -> Option<lapin::Queue> {
        let connection = connect_any(&self.broker).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let found = channel.queue_declare(queue.into(), options, FieldTable::default()).await.ok();
        let _ = connection.close(200, "done".into()).await;
        found
    }

    /// Takes every message off a queue.
    pub async fn drain(&self, queue: &str) -> Vec<BasicGetMessage> {
        let mut out = Vec::new();
        while let Some(m) = self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            out.push(m);
        }
        out
    }

    /// Declares a queue named and bound the way every OpenStack publisher declares its default
    /// `notifications.info` queue (on this test's `nova` exchange), and returns its name.
    pub async fn declare_openstack_queue(&self) -> String {
        let name = format!("{}notifications.info", self.prefix);
        self.channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        self.channel
            .queue_bind(
                name.as_str().into(),
                self.exchange("nova").as_str().into(),
                "notifications.info".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        name
    }

    /// A raw channel for declarations the test makes itself.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Deletes this test's queues and exchanges.
    pub async fn cleanup(&self) {
        let names = self.names();
        let channel = self.connection.create_channel().await.unwrap();
        let concertim = Names::concertim(&self.settings.bus);
        let mut queues = vec![names.queue, names.retry_queue, names.dead_queue, concertim.queue, concertim.retry_queue];
        queues.extend(topology::shard_queues(&self.settings.bus));
        for queue in queues {
            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
        let mut exchanges = vec![
            names.retry_exchange.clone(),
            names.dead_exchange.clone(),
            concertim.retry_exchange,
            topology::shard_exchange(&self.settings.bus),
        ];
        exchanges.extend(
            ["nova", "keystone", "ceilometer", "heat", "glance", "cinder", "neutron"].map(|e| self.exchange(e)),
        );
        for exchange in exchanges {
            let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
    }
}

/// How long one node of a cluster may take to accept the test's connection.
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the broker at `broker`; of a cluster (oslo's multi-host URL), to the first
/// node that answers. What each node answered when none does.
pub async fn connect_any(broker: &str) -> Result<Connection, String> {
    let mut failures = Vec::new();
    for node in bus::nodes(&SecretUrl::new(broker)) {
        let connecting = Connection::connect(node.expose(), ConnectionProperties::default());
        match tokio::time::timeout(NODE_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(e)) => failures.push(format!("{}: {e}", node.redacted())),
            Err(_) => failures.push(format!("{}: no answer within {NODE_TIMEOUT:?}", node.redacted())),
        }
    }
    Err(failures.join("; "))
}

/// The service, running in this process against the test's namespace.
pub struct TestApp<B> {
    /// The executor the consumer uses (and its billing backend).
    pub executor: Arc<Executor<B>>,
    /// Whether it consumes now (what `/readyz` reports).
    pub health: Arc<Health>,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), BusError>>,
}

/// Starts the consumer with `billing`, the settings of `bus` (possibly with another broker URL),
/// and waits until it consumes.
pub async fn spawn_app<B: Billing + 'static>(bus: &TestBus, billing: B, url: Option<String>) -> TestApp<B> {
    let mut settings = bus.settings.clone();
    if let Some(url) = url {
        settings.bus.url = SecretUrl::new(url);
    }
    start(App::new(settings, billing)).await
}

/// The shared secret [`spawn_app_with_api`] configures.
pub const API_SECRET: &str = "test-secret-shared-with-concertim-0123456789";

/// [`spawn_app`] serving the billing API too, signed with [`API_SECRET`]; with its base URL.
pub async fn spawn_app_with_api<B: Billing + Accounts + 'static>(bus: &TestBus, billing: B) -> (TestApp<B>, String) {
    let mut settings = bus.settings.clone();
    settings.api.jwt_secret = Some(concertim_billing::config::Secret::new(API_SECRET));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (start(App::new(settings, billing).with_api(listener)).await, url)
}

async fn start<B: Billing + 'static>(app: App<B>) -> TestApp<B> {
    let (executor, health) = (Arc::clone(&app.executor), Arc::clone(&app.health));
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run(shutdown.clone()));
    eventually("the consumer to start", Duration::from_secs(20), || async { health.is_consuming().then_some(()) })
        .await;
    TestApp { executor, shutdown, handle, health }
}

impl<B: Billing + 'static> TestApp<B> {
    /// Stops the consumer as SIGTERM does and waits for it.
    pub async fn shutdown(self) -> Result<(), BusError> {
        self.shutdown.cancel();
        self.handle.await.expect("the consumer task does not panic")
    }
}

/// A ledger (`inner`) with injected faults and call counts (`hooks`).
pub type Faulty = Hooked<Ledger, Faults>;

/// The faults a [`Faulty`] ledger injects, and what it counts.
#[derive(Default)]
pub struct Faults {
    /// `record_usage` fails transiently while this is above zero (counting down).
    pub usage_failures: AtomicUsize,
    /// `record_usage` always fails transiently while this is set.
    pub usage_always_fails: std::sync::atomic::AtomicBool,
    /// `ensure_account` panics for this project.
    pub panic_on_project: Option<String>,
    /// `record_usage` calls that recorded something (not "already recorded").
    pub usage_recorded: AtomicUsize,
}

/// A ledger without faults; set its hooks' fields to inject some.
pub fn faulty() -> Faulty {
    Hooked { inner: Arc::new(Ledger::in_memory()), hooks: Faults::default() }
}

fn injected() -> BillingError {
    BillingError::LedgerIo { path: "(injected)".into(), source: std::io::Error::other("injected transient failure") }
}

impl Hooks for Faults {
    fn before(&self, call: Call<'_>, _: Context<'_>) -> Result<(), BillingError> {
        match call {
            Call::EnsureAccount(project) if self.panic_on_project.as_deref() == Some(project.as_str()) => {
                panic!("injected panic for project {project}")
            }
            Call::RecordUsage(_) => {
                if self.usage_always_fails.load(Ordering::SeqCst)
                    || self
                        .usage_failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    return Err(injected());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn after(&self, call: Call<'_>, _: Context<'_>, result: &Result<Applied, BillingError>) {
        if matches!(call, Call::RecordUsage(_)) && matches!(result, Ok(applied) if *applied != Applied::AlreadyDone) {
            self.usage_recorded.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A TCP proxy in front of the broker whose connections can all be cut at once.
pub struct Proxy {
    /// `amqp://…` through the proxy.
    pub url: String,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
}

impl Proxy {
    /// Starts a proxy to 127.0.0.1:5672 on a free port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        tokio::spawn({
            let generation = Arc::clone(&generation);
            let accepted = Arc::clone(&accepted);
            let down = Arc::clone(&down);
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        // The broker is "away": the connection is closed at once.
                        continue;
                    }
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let cut = generation.lock().unwrap().clone();
                    tokio::spawn(async move {
                        let Ok(mut upstream) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            () = cut.cancelled() => {}
                        }
                    });
                }
            }
        });
        Self { url: format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), generation, down, accepted }
    }

    /// Takes the broker away (every connection cut, new ones refused), or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// Drops every open connection (new ones are accepted again).
    pub fn cut(&self) {
        let mut generation = self.generation.lock().unwrap();
        generation.cancel();
        *generation = CancellationToken::new();
    }
}

/// The `concertim-billing run` command for this test's namespace, keeping its ledger in
/// `ledger`, configured the way an operator would: through `CONCERTIM_BILLING_*` variables.
pub fn service_command(bus: &TestBus, ledger: &std::path::Path) -> std::process::Command {
    let mut command = cli_command(bus);
    command.args(["run", "--ledger", ledger.to_str().unwrap()]).stdout(std::process::Stdio::null());
    command
}

/// The `concertim-billing` command configured for this test's namespace through
/// `CONCERTIM_BILLING_*` variables, as an operator would configure it; add the arguments.
pub fn cli_command(bus: &TestBus) -> std::process::Command {
    let b = &bus.settings.bus;
    let bindings: Vec<String> = b
        .bindings
        .iter()
        .map(|x| format!("{{exchange = \"{}\", routing_key = \"{}\"}}", x.exchange, x.routing_key))
        .collect();
    let mut command = super::binary();
    command
        .env("CONCERTIM_BILLING_AMQP_URL", &bus.broker)
        .env("CONCERTIM_BILLING_BUS__PREFIX", &b.prefix)
        .env("CONCERTIM_BILLING_BUS__BINDINGS", format!("[{}]", bindings.join(", ")))
        .env("CONCERTIM_BILLING_BUS__RETRY_DELAY_MS", b.retry_delay_ms.to_string())
        .env("CONCERTIM_BILLING_BUS__MAX_ATTEMPTS", b.max_attempts.to_string())
        .env("CONCERTIM_BILLING_BUS__LANES", b.lanes.to_string())
        .env("CONCERTIM_BILLING_BUS__PREFETCH", b.prefetch.to_string())
        // Tests run several services at once: no listener unless a test asks for one.
        .env("CONCERTIM_BILLING_HTTP__LISTEN", "")
        .env(
            "CONCERTIM_BILLING_BILLING__METERS",
            format!("{{\"{TEST_METER}\" = {{unit = \"{TEST_UNIT}\", factor = \"1\", counter = \"delta\"}}}}"),
        )
        .env("CONCERTIM_BILLING_BILLING__TIME__SETTLE_EVERY_S", bus.settings.billing.time.settle_every_s.to_string())
        .env("CONCERTIM_BILLING_STATE__PATH", std::env::temp_dir().join(format!("{}state.db", bus.prefix)))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::inherit());
    command
}

/// `count` distinct Ceilometer messages (fresh `message_id`s, and sample times a second apart)
/// for the same instance, each with one [`TEST_METER`] sample of the template's volume.
pub fn usage_batch(template: &FixtureDelivery, count: usize) -> Vec<FixtureDelivery> {
    let envelope: serde_json::Value = serde_json::from_slice(&template.body).unwrap();
    let message: serde_json::Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    let base =
        concertim_billing::event::Timestamp::parse(message["payload"][0]["timestamp"].as_str().unwrap()).unwrap();
    (0..count)
        .map(|i| {
            let mut message = message.clone();
            message["message_id"] = serde_json::json!(format!("batch-{i:06}"));
            let at = concertim_billing::event::Timestamp::from_unix(base.unix() + i as i64).unwrap();
            message["payload"][0]["timestamp"] = serde_json::json!(at.to_rfc3339());
            let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
            FixtureDelivery { body: serde_json::to_vec(&body).unwrap(), ..template.clone() }
        })
        .collect()
}

/// A Ceilometer message with usage for one instance of the lifecycle fixtures: one
/// [`TEST_METER`] sample of 10 (the fixture's first sample, made a delta of the test meter).
pub fn usage_fixture() -> FixtureDelivery {
    let template =
        super::deliveries("duplicates").into_iter().find(|d| d.exchange.as_deref() == Some("ceilometer")).unwrap();
    test_usage_of(&template)
}

/// A Ceilometer message `template` with its first sample made a [`TEST_METER`] delta sample of
/// 10 (same resource, project, time, metadata and message id) and its other samples dropped.
pub fn test_usage_of(template: &FixtureDelivery) -> FixtureDelivery {
    let envelope: serde_json::Value = serde_json::from_slice(&template.body).unwrap();
    let mut message: serde_json::Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    let mut sample = message["payload"][0].clone();
    sample["counter_name"] = TEST_METER.into();
    sample["counter_type"] = "delta".into();
    sample["counter_unit"] = "unit".into();
    sample["counter_volume"] = 10.into();
    message["payload"] = serde_json::json!([sample]);
    let body = serde_json::json!({"oslo.version": "2.0", "oslo.message": message.to_string()});
    FixtureDelivery { body: serde_json::to_vec(&body).unwrap(), ..template.clone() }
}

/// [`TEST_UNIT`]s billed in the embedded store of `run --ledger FILE` (0 before it exists).
pub async fn billed_test_units(ledger: &std::path::Path) -> u64 {
    use rust_decimal::prelude::ToPrimitive;
    if !ledger.exists() {
        return 0;
    }
    let Ok(store) = concertim_billing::store::Store::open(&ledger.to_string_lossy()).await else { return 0 };
    let Ok(ledger) = Ledger::in_store(Arc::new(store)).await else { return 0 };
    ledger.snapshot().usage.iter().filter(|u| u.unit.as_str() == TEST_UNIT).map(|u| u.amount.to_u64().unwrap()).sum()
}

/// Sends a signal to a child process.
pub fn signal(child: &std::process::Child, name: &str) {
    let status =
        std::process::Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill -{name} failed");
}
