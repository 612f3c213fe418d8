//! The consumers: a queue → lanes → a [`Handler`] → [`ack`](super::ack), with reconnection and
//! graceful shutdown.
//!
//! Two handlers run on this machinery, each on its own connection: billing, on our main queue,
//! and, when Concertim is configured, the Concertim updates on their own queue (see
//! [`crate::concertim`]). Billing publishes a notification's Concertim work, confirmed, before
//! it acknowledges the notification, and never waits for Concertim itself.
//!
//! One project's messages always go to the same lane and are handled there one after the other,
//! in order; different projects are handled concurrently. A transient failure is retried in
//! process (see [`crate::retry`]), then through the handler's retry queue. A handler that panics
//! loses only its message, which is dead-lettered. When the connection or a channel fails, the
//! session ends, lanes finish what they hold (their acks fail, so the broker redelivers those
//! messages), and a new session connects with backoff and declares the topology again.

use std::{
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

use futures_lite::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions},
    types::FieldTable,
};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument as _};

use super::{
    ack::{self, Settled, Settler, Verdict},
    broker_error, connect, intake, topology, BusError, Names,
};
use crate::{
    billing::Billing,
    class::{chain, ErrorClass, Fate, Label},
    concertim::{self, Work, Worker},
    config::{BackoffSettings, BusSettings, Settings},
    event::{Notification, Timestamp},
    executor::{Executor, Outcome},
    notification::DecodeError,
    retry,
    telemetry::{self, Health},
};

/// Consumes until `shutdown` is cancelled, reconnecting whenever the broker goes away. Returns
/// once in-flight messages finished (or the shutdown deadline passed) and the connection closed.
/// When the executor's settings configure Concertim, its updates are consumed alongside, on a
/// connection of their own. `health` hears whether billing is consuming (what `/readyz`
/// answers).
///
/// # Errors
/// Only a permanent problem ends the loop: a topology that conflicts with what exists on the
/// broker ([`BusError::Precondition`], whose message names the option to change).
pub async fn run<B: Billing + 'static>(
    bus: &BusSettings,
    executor: Arc<Executor<B>>,
    shutdown: CancellationToken,
    health: Arc<Health>,
) -> Result<(), BusError> {
    let settings = executor.settings().clone();
    let worker = match &settings.concertim {
        Some(c) => Some(Arc::new(
            Worker::new(c.clone(), executor.shared_billing())
                .map_err(|e| BusError::Config { detail: format!("concertim: {e}") })?,
        )),
        None => None,
    };
    run_both(bus, &settings, executor, worker, shutdown, health).await
}

/// As [`run`], with the Concertim worker made.
async fn run_both<B: Billing + 'static>(
    bus: &BusSettings,
    settings: &Settings,
    executor: Arc<Executor<B>>,
    worker: Option<Arc<Worker<B>>>,
    shutdown: CancellationToken,
    health: Arc<Health>,
) -> Result<(), BusError> {
    // Either loop failing for good stops the other.
    let stop = shutdown.child_token();
    // Sharded: the billing consumer reads every shard (the broker makes it the active consumer
    // of some), and the intake feeds the shards from the main queue.
    let sharded = bus.shards > 0;
    let queues = if sharded { spread(topology::shard_queues(bus)) } else { vec![Names::new(bus).queue] };
    let intake = async {
        if !sharded {
            return Ok(());
        }
        let result = intake_loop(bus, &executor, &stop, &health).await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let billing = Consumer {
        queues,
        upstream: true,
        names: Names::new(bus),
        tag: "concertim-billing",
        prefetch: bus.prefetch,
        lanes: bus.lanes,
        max_attempts: bus.max_attempts,
    };
    let forward = settings.concertim.as_ref().map(|_| Names::concertim(bus).queue);
    let handler = Arc::new(BillingHandler { executor: Arc::clone(&executor), backoff: bus.backoff.clone(), forward });
    let billing = async {
        let result = consume(bus, settings, billing, handler, &stop, Some(&health)).await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let (Some(worker), Some(concertim_settings)) = (worker, settings.concertim.clone()) else {
        let (billing, intake) = tokio::join!(billing, intake);
        return billing.and(intake);
    };
    let names = Names::concertim(bus);
    let consumer = Consumer {
        queues: vec![names.queue.clone()],
        upstream: false,
        names,
        tag: "concertim-billing-concertim",
        prefetch: bus.prefetch,
        lanes: concertim_settings.lanes,
        max_attempts: concertim_settings.max_attempts,
    };
    let handler = Arc::new(ConcertimHandler { worker, backoff: concertim_settings.backoff.clone() });
    let concertim = async {
        let result = consume(bus, settings, consumer, handler, &stop, None).await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let (billing, concertim, intake) = tokio::join!(billing, concertim, intake);
    billing.and(concertim).and(intake)
}

/// The shard queues in the order this replica registers on them: rotated by a per-process
/// offset, so that replicas starting together become the active consumers of different shards.
///
/// FIXME: a single active consumer stays active until it goes away, so a replica started after
/// the others took every shard is a hot standby: sharding gives per-project order and failover,
/// not more throughput than one replica, unless the replicas start together. Rebalancing needs
/// consumer priorities with single active consumer (RabbitMQ 4.x) or a hand-over protocol.
fn spread(mut queues: Vec<String>) -> Vec<String> {
    if queues.len() > 1 {
        let mut hasher = DefaultHasher::new();
        std::process::id().hash(&mut hasher);
        std::time::SystemTime::now().hash(&mut hasher);
        let offset = (hasher.finish() % queues.len() as u64) as usize;
        queues.rotate_left(offset);
    }
    queues
}

/// What a consumer reads and how it settles.
struct Consumer {
    /// One queue, or the shard queues.
    queues: Vec<String>,
    /// Whether this consumer binds the main queue to OpenStack's exchanges (billing does).
    upstream: bool,
    names: Names,
    tag: &'static str,
    prefetch: u16,
    lanes: usize,
    max_attempts: u32,
}

/// What a consumer does with its messages.
trait Handler: Send + Sync + 'static {
    /// A delivery read far enough to choose its lane and name its span.
    type Prepared: Send + 'static;

    /// Reads a delivery.
    fn prepare(&self, delivery: &Delivery) -> Self::Prepared;

    /// The lane key (a project), when there is one.
    fn lane_key(prepared: &Self::Prepared) -> Option<&str>;

    /// The span every log line of the message carries.
    fn span(prepared: &Self::Prepared) -> tracing::Span;

    /// Runs the message to its verdict, retrying transient failures in process.
    fn process(self: &Arc<Self>, prepared: Self::Prepared, redelivered: bool)
        -> impl Future<Output = Processed> + Send;
}

/// A message's verdict, its metric label, and the work to publish before acknowledging it.
struct Processed {
    verdict: Verdict,
    label: Label,
    forward: Option<(String, Work)>,
}

async fn consume<H: Handler>(
    bus: &BusSettings,
    settings: &Settings,
    consumer: Consumer,
    handler: Arc<H>,
    shutdown: &CancellationToken,
    health: Option<&Health>,
) -> Result<(), BusError> {
    let what = consumer.queues.join(", ");
    reconnecting(bus, &what, shutdown, || async {
        let session = session(bus, settings, &consumer, &handler, shutdown, health).await;
        if let Some(health) = health {
            health.set_consuming(false);
        }
        session
    })
    .await
}

/// The sharded topology's intake, reconnecting like the consumers.
async fn intake_loop<B: Billing + 'static>(
    bus: &BusSettings,
    executor: &Arc<Executor<B>>,
    shutdown: &CancellationToken,
    health: &Health,
) -> Result<(), BusError> {
    let what = format!("{} (intake)", Names::new(bus).queue);
    reconnecting(bus, &what, shutdown, || async {
        Ok(match intake::session(bus, executor, shutdown, health).await? {
            intake::IntakeEnd::Shutdown => End::Shutdown,
            // Moving messages counts as consuming: the next failure waits from the start.
            intake::IntakeEnd::Lost => End::Lost { consumed: true },
        })
    })
    .await
}

/// Runs `session` again and again, waiting with backoff after each failure, until shutdown or
/// a permanent error.
async fn reconnecting<F, Fut>(
    bus: &BusSettings,
    what: &str,
    shutdown: &CancellationToken,
    mut session: F,
) -> Result<(), BusError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<End, BusError>>,
{
    let mut reconnect = retry::reconnect(std::time::Duration::from_millis(bus.reconnect_max_ms));
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match session().await {
            Ok(End::Shutdown) => return Ok(()),
            Ok(End::Lost { consumed }) => {
                if consumed {
                    reconnect.reset();
                }
                warn!(queue = %what, "lost the broker; reconnecting");
            }
            Err(e) if e.class() == ErrorClass::Permanent => return Err(e),
            Err(e) => warn!(queue = %what, error.message = %e, "cannot consume; retrying"),
        }
        let wait = reconnect.next_wait().unwrap_or(std::time::Duration::from_millis(bus.reconnect_max_ms));
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// How often an absent upstream exchange is looked for again.
const UPSTREAM_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Looks for the absent upstream exchanges until each is bound (OpenStack declares them when
/// its services first publish).
async fn watch_upstream(bus: BusSettings, mut absent: Vec<crate::config::Binding>) {
    while !absent.is_empty() {
        tokio::time::sleep(UPSTREAM_POLL).await;
        match topology::bind_some(&bus, &absent).await {
            Ok(still) => {
                for bound in absent.iter().filter(|b| !still.contains(b)) {
                    info!(exchange = %bound.exchange, routing_key = %bound.routing_key, "bound to the upstream exchange");
                }
                absent = still;
            }
            Err(e) => warn!(error.message = %e, "cannot look for the upstream exchanges; trying again"),
        }
    }
}

/// A task that ends with the value that holds it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum End {
    Shutdown,
    Lost { consumed: bool },
}

struct Job<P> {
    delivery: Delivery,
    prepared: P,
}

async fn session<H: Handler>(
    bus: &BusSettings,
    settings: &Settings,
    consumer: &Consumer,
    handler: &Arc<H>,
    shutdown: &CancellationToken,
    health: Option<&Health>,
) -> Result<End, BusError> {
    let Opened { connection, _watcher, publisher, consuming, tags, streams } =
        super::answered(&bus.url, "the consumer's set-up", open(bus, settings, consumer)).await?;
    let mut deliveries = Deliveries::new(streams, consumer.prefetch);
    info!(queue = %consumer.queues.join(", "), url = %bus.url, lanes = consumer.lanes, "consuming");
    if let Some(health) = health {
        health.set_consuming(true);
    }

    let settler = Settler::new(publisher, consumer.names.clone(), consumer.max_attempts);
    let trouble = CancellationToken::new();
    let mut lanes = JoinSet::new();
    let mut senders = Vec::with_capacity(consumer.lanes);
    for _ in 0..consumer.lanes {
        let (tx, rx) = mpsc::channel(usize::from(consumer.prefetch));
        senders.push(tx);
        lanes.spawn(lane(rx, Arc::clone(handler), settler.clone(), trouble.clone()));
    }

    let mut consumed = false;
    let end = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // Stop new deliveries; what was already delivered is finished below.
                for tag in &tags {
                    let _ = consuming.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                }
                break End::Shutdown;
            }
            () = trouble.cancelled() => break End::Lost { consumed },
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    consumed = true;
                    metrics::gauge!(telemetry::IN_FLIGHT).increment(1.0);
                    let prepared = handler.prepare(&delivery);
                    let lane = lane_of(H::lane_key(&prepared), delivery.delivery_tag, senders.len());
                    // A busy lane must not hold up shutdown or reconnection: a job dropped here
                    // is unacknowledged, so the broker delivers it again.
                    tokio::select! {
                        sent = senders[lane].send(Job { delivery, prepared }) => {
                            if sent.is_err() {
                                break End::Lost { consumed };
                            }
                        }
                        () = shutdown.cancelled() => break End::Shutdown,
                        () = trouble.cancelled() => break End::Lost { consumed },
                    }
                }
                Some(Err(e)) => {
                    warn!(error.message = %e, "the consumer failed");
                    break End::Lost { consumed };
                }
                None => break End::Lost { consumed },
            },
        }
    };

    drop(senders);
    match end {
        End::Shutdown => {
            let drained =
                tokio::time::timeout(bus.shutdown_deadline(), async { while lanes.join_next().await.is_some() {} })
                    .await;
            if drained.is_err() {
                warn!("in-flight messages did not finish within the shutdown deadline; the broker will redeliver them");
            }
        }
        // The channel is gone, so nothing in the lanes can be acknowledged any more: the broker
        // redelivers all of it to the next session. Waiting would only delay the reconnection
        // (a publisher confirm can wait long on a dead connection).
        End::Lost { .. } => {}
    }
    lanes.abort_all();
    while lanes.join_next().await.is_some() {}
    if matches!(end, End::Shutdown) {
        let _ = connection.close(200, "shutting down".into()).await;
        info!(queue = %consumer.queues.join(", "), "stopped consuming");
    }
    Ok(end)
}

/// A consumer's connection, set up and consuming.
struct Opened {
    connection: lapin::Connection,
    /// Looks for absent upstream exchanges while the session lasts.
    _watcher: Option<AbortOnDrop>,
    publisher: lapin::Channel,
    consuming: lapin::Channel,
    tags: Vec<String>,
    streams: Vec<lapin::Consumer>,
}

/// Connects, declares the topology, binds upstream and starts consuming `consumer`'s queues.
async fn open(bus: &BusSettings, settings: &Settings, consumer: &Consumer) -> Result<Opened, BusError> {
    let broker = broker_error(&bus.url);
    let connection = connect(&bus.url, consumer.tag).await?;
    let setup = connection.create_channel().await.map_err(&broker)?;
    topology::declare(&setup, bus).await?;
    if let Some(concertim) = &settings.concertim {
        topology::declare_concertim(&setup, bus, concertim).await?;
    }
    // Bound to what OpenStack has declared; the rest is looked for while this session lasts.
    let _watcher = if consumer.upstream {
        let absent = topology::bind_upstream(bus).await?;
        for binding in &absent {
            warn!(exchange = %binding.exchange, routing_key = %binding.routing_key, error.message = %BusError::UpstreamAbsent { exchange: binding.exchange.clone() }, "not bound yet");
        }
        (!absent.is_empty()).then(|| AbortOnDrop(tokio::spawn(watch_upstream(bus.clone(), absent))))
    } else {
        None
    };
    let publisher = connection.create_channel().await.map_err(&broker)?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(&broker)?;
    let consuming = connection.create_channel().await.map_err(&broker)?;
    // FIXME(memory): lapin hands a delivery over only once its whole body has arrived, so a
    // body over decode.max_body_bytes is buffered before it can be refused. The bound is the
    // broker's max_message_size (deploy/rabbitmq/rabbitmq.conf: 4 MiB) × bus.prefetch; without
    // that setting one publisher can make this process hold prefetch × 128 MiB.
    consuming.basic_qos(consumer.prefetch, BasicQosOptions::default()).await.map_err(&broker)?;
    let mut tags = Vec::with_capacity(consumer.queues.len());
    let mut streams = Vec::with_capacity(consumer.queues.len());
    for (i, queue) in consumer.queues.iter().enumerate() {
        let tag = if consumer.queues.len() == 1 { consumer.tag.to_owned() } else { format!("{}-{i}", consumer.tag) };
        let stream = consuming
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(&broker)?;
        tags.push(tag);
        streams.push(stream);
    }
    Ok(Opened { connection, _watcher, publisher, consuming, tags, streams })
}

/// The deliveries of one consumer, or of several merged. A consumer whose stream ends (its
/// channel closed, or the broker cancelled it) ends the merged stream: the session then
/// reconnects rather than go on with a shard unread.
enum Deliveries {
    /// One queue: read directly, without a hop.
    One(lapin::Consumer),
    /// Several queues (the shards): a task per consumer forwards into one channel.
    Many {
        /// What the forwarders send; `None` when one of them ended.
        merged: mpsc::Receiver<Option<Result<Delivery, lapin::Error>>>,
        /// The forwarders, stopped when the session drops this.
        _forwarders: tokio_util::task::AbortOnDropHandle<()>,
    },
}

impl Deliveries {
    fn new(mut streams: Vec<lapin::Consumer>, prefetch: u16) -> Self {
        if streams.len() == 1 {
            if let Some(one) = streams.pop() {
                return Self::One(one);
            }
        }
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)));
        let forward = async move {
            let mut tasks = JoinSet::new();
            for mut stream in streams {
                let tx = tx.clone();
                tasks.spawn(async move {
                    while let Some(next) = stream.next().await {
                        if tx.send(Some(next)).await.is_err() {
                            return;
                        }
                    }
                    let _ = tx.send(None).await;
                });
            }
            drop(tx);
            while tasks.join_next().await.is_some() {}
        };
        Self::Many { merged: rx, _forwarders: tokio_util::task::AbortOnDropHandle::new(tokio::spawn(forward)) }
    }

    async fn next(&mut self) -> Option<Result<Delivery, lapin::Error>> {
        match self {
            Self::One(stream) => stream.next().await,
            Self::Many { merged, .. } => merged.recv().await.flatten(),
        }
    }
}

/// One project's messages always map to the same lane; messages without a project spread out.
fn lane_of(key: Option<&str>, delivery_tag: u64, lanes: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    match key {
        Some(project) => project.hash(&mut hasher),
        None => delivery_tag.hash(&mut hasher),
    }
    (hasher.finish() % lanes as u64) as usize
}

async fn lane<H: Handler>(
    mut jobs: mpsc::Receiver<Job<H::Prepared>>,
    handler: Arc<H>,
    settler: Settler,
    trouble: CancellationToken,
) {
    while let Some(Job { delivery, prepared }) = jobs.recv().await {
        let span = H::span(&prepared);
        handle_job(&handler, &settler, &trouble, delivery, prepared).instrument(span).await;
    }
}

/// Processes one message and settles it: the one place a lane acts on the broker.
async fn handle_job<H: Handler>(
    handler: &Arc<H>,
    settler: &Settler,
    trouble: &CancellationToken,
    delivery: Delivery,
    prepared: H::Prepared,
) {
    let redelivered = delivery.redelivered || ack::attempts(&delivery, settler.queue()) > 0;
    let Processed { verdict, label, forward } = handler.process(prepared, redelivered).await;
    if let Some((queue, work)) = forward {
        // The Concertim work is on its queue before the notification is acknowledged: a crash
        // in between redelivers the notification, whose billing is idempotent.
        if let Err(e) = settler.forward(&queue, &work).await {
            metrics::gauge!(telemetry::IN_FLIGHT).decrement(1.0);
            warn!(error.message = %e, "cannot hand the Concertim work over; reconnecting");
            trouble.cancel();
            return;
        }
    }
    let reason = match &verdict {
        Verdict::Ack => None,
        Verdict::Retry { reason } | Verdict::DeadLetter { reason, .. } => Some(reason.clone()),
    };
    let target = settler.target();
    let settled = settler.settle(delivery, verdict).await;
    metrics::gauge!(telemetry::IN_FLIGHT).decrement(1.0);
    match settled {
        Ok(Settled::Acked) => info!(outcome = label.as_str(), "done"),
        Ok(Settled::Retried(attempt)) => {
            metrics::counter!(telemetry::RETRIED, "target" => target).increment(1);
            warn!(attempt, reason = reason.unwrap_or_default(), "retrying later");
        }
        Ok(Settled::DeadLettered(attempt)) => {
            metrics::counter!(telemetry::DEAD_LETTERED, "class" => label.as_str(), "target" => target).increment(1);
            warn!(attempt, class = label.as_str(), reason = reason.unwrap_or_default(), "dead-lettered");
        }
        Err(e) => {
            // Left unacknowledged: the broker redelivers it on the next connection.
            warn!(error.message = %e, "cannot settle; reconnecting");
            trouble.cancel();
        }
    }
}

/// Runs `attempt` (each run in its own task, so a panic loses only this message) until it
/// is done or failed for good, retrying failures worth retrying in process; then the verdict.
async fn with_retries<F, Fut>(backoff: &BackoffSettings, mut attempt: F) -> (Verdict, Label)
where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = Fate> + Send + 'static,
{
    let mut schedule = retry::in_process(backoff);
    let mut again = false;
    loop {
        let reason = match tokio::spawn(attempt(again)).await {
            Err(join) => {
                let class = ErrorClass::Permanent;
                return (Verdict::DeadLetter { class, reason: panic_reason(join) }, Label::Failed(class));
            }
            Ok(Fate::Done(label)) => return (Verdict::Ack, label),
            Ok(Fate::DeadLetter(class, reason)) => {
                return (Verdict::DeadLetter { class, reason }, Label::Failed(class))
            }
            Ok(Fate::Retry(reason)) => reason,
        };
        again = true;
        match schedule.next_wait() {
            Some(wait) => tokio::time::sleep(wait).await,
            None => return (Verdict::Retry { reason }, Label::Failed(ErrorClass::Transient)),
        }
    }
}

/// Billing: notifications from our main queue through the executor.
struct BillingHandler<B> {
    executor: Arc<Executor<B>>,
    backoff: BackoffSettings,
    /// The Concertim queue, when Concertim is configured.
    forward: Option<String>,
}

/// A notification as decoded for its lane.
struct Decoded {
    decoded: Result<Notification, DecodeError>,
}

impl<B: Billing + 'static> Handler for BillingHandler<B> {
    type Prepared = Decoded;

    fn prepare(&self, delivery: &Delivery) -> Decoded {
        Decoded { decoded: self.executor.decode(&delivery.data) }
    }

    fn lane_key(prepared: &Decoded) -> Option<&str> {
        prepared.decoded.as_ref().ok().and_then(|n| n.event.project()).map(|p| p.as_str())
    }

    fn span(prepared: &Decoded) -> tracing::Span {
        let decoded = &prepared.decoded;
        let message_id = decoded.as_ref().map(|n| n.meta.message_id.to_string()).unwrap_or_default();
        let event_type = decoded.as_ref().map(|n| n.meta.event_type.clone()).unwrap_or_default();
        // Every log line of this message, ours and the adapters', carries these fields.
        let span = tracing::info_span!(
            "message",
            message_id = %message_id,
            event_type = %event_type,
            project_id = tracing::field::Empty,
            instance_id = tracing::field::Empty,
        );
        if let Ok(n) = decoded {
            if let Some(project) = n.event.project() {
                span.record("project_id", project.as_str());
            }
            if let Some(instance) = n.event.instance() {
                span.record("instance_id", instance.as_str());
            }
        }
        span
    }

    async fn process(self: &Arc<Self>, prepared: Decoded, redelivered: bool) -> Processed {
        let source = prepared.decoded.as_ref().map_or("invalid", |n| telemetry::source(&n.event));
        let timestamp = prepared.decoded.as_ref().ok().map(|n| n.meta.timestamp);
        let (verdict, label, forward) = match prepared.decoded {
            Err(e) => {
                let class = ErrorClass::Invalid;
                (Verdict::DeadLetter { class, reason: chain(&e) }, Label::Failed(class), None)
            }
            Ok(notification) => self.bill(Arc::new(notification), redelivered).await,
        };
        metrics::counter!(telemetry::MESSAGES, "outcome" => label.as_str(), "source" => source).increment(1);
        if let (Some(at), Label::Processed) = (timestamp, label) {
            record_lag(at);
        }
        Processed { verdict, label, forward }
    }
}

fn record_lag(at: Timestamp) {
    let lag = time::OffsetDateTime::now_utc() - at.as_offset();
    metrics::histogram!(telemetry::LAG).record(lag.as_seconds_f64().max(0.0));
}

impl<B: Billing + 'static> BillingHandler<B> {
    /// Bills a notification; once done, also its Concertim work to hand over.
    async fn bill(
        &self,
        notification: Arc<Notification>,
        redelivered: bool,
    ) -> (Verdict, Label, Option<(String, Work)>) {
        let (verdict, label) = with_retries(&self.backoff, |again| {
            let executor = Arc::clone(&self.executor);
            let notification = Arc::clone(&notification);
            async move {
                let outcome = executor.execute(&notification, redelivered || again).await;
                if let Outcome::Processed { .. } = outcome {
                    if let Err(e) = executor.commit().await {
                        return Fate::Retry(chain(&e));
                    }
                }
                outcome.fate()
            }
        })
        .await;
        let forward = match verdict {
            Verdict::Ack => self.forward.as_ref().and_then(|queue| {
                concertim::work(&notification, self.executor.settings()).map(|work| (queue.clone(), work))
            }),
            _ => None,
        };
        (verdict, label, forward)
    }
}

/// Concertim: the updates billing handed over, on the Concertim queue.
struct ConcertimHandler<B> {
    worker: Arc<Worker<B>>,
    backoff: BackoffSettings,
}

impl<B: Billing + 'static> Handler for ConcertimHandler<B> {
    type Prepared = Result<Work, String>;

    fn prepare(&self, delivery: &Delivery) -> Self::Prepared {
        serde_json::from_slice(&delivery.data).map_err(|e| format!("not Concertim work: {e}"))
    }

    fn lane_key(prepared: &Self::Prepared) -> Option<&str> {
        prepared.as_ref().ok().and_then(|w| w.project.as_ref()).map(|p| p.as_str())
    }

    fn span(prepared: &Self::Prepared) -> tracing::Span {
        let (message_id, event_type) =
            prepared.as_ref().map(|w| (w.message_id.as_str(), w.event_type.as_str())).unwrap_or_default();
        tracing::info_span!("concertim", message_id = %message_id, event_type = %event_type)
    }

    async fn process(self: &Arc<Self>, prepared: Self::Prepared, _redelivered: bool) -> Processed {
        let (verdict, label) = match prepared {
            Err(reason) => {
                let class = ErrorClass::Invalid;
                (Verdict::DeadLetter { class, reason }, Label::Failed(class))
            }
            Ok(work) => {
                let work = Arc::new(work);
                with_retries(&self.backoff, |_| {
                    let worker = Arc::clone(&self.worker);
                    let work = Arc::clone(&work);
                    async move {
                        match worker.apply_all(&work).await {
                            Ok(_) => Fate::Done(Label::Processed),
                            Err((what, e)) => Fate::failed(
                                e.class(),
                                format!("concertim: {}: {what}: {}", work.event_type, chain(&e)),
                            ),
                        }
                    }
                })
                .await
            }
        };
        Processed { verdict, label, forward: None }
    }
}

fn panic_reason(join: tokio::task::JoinError) -> String {
    if !join.is_panic() {
        return "the handler was cancelled".to_owned();
    }
    let payload = join.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    format!("the handler panicked: {message}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{billing::Ledger, config::Settings, executor::Executor};

    #[test]
    fn one_projects_messages_always_take_the_same_lane() {
        let handler = BillingHandler {
            executor: Arc::new(Executor::new(Settings::embedded(), Ledger::in_memory())),
            backoff: BackoffSettings::default(),
            forward: None,
        };
        let body = |id: &str| {
            format!(
                r#"{{"message_id":"{id}","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{{"resource_info":"p1"}}}}"#
            )
        };
        let delivery = |tag: u64, body: &[u8]| {
            Delivery::mock(tag, "nova".into(), "notifications.info".into(), false, body.to_vec())
        };
        let lanes: Vec<usize> = (0..20u64)
            .map(|tag| {
                let prepared = handler.prepare(&delivery(tag, body(&format!("m{tag}")).as_bytes()));
                lane_of(BillingHandler::<Ledger>::lane_key(&prepared), tag, 8)
            })
            .collect();
        assert!(lanes.iter().all(|l| *l == lanes[0]), "{lanes:?}");
        // Messages without a project spread over the lanes.
        let spread: std::collections::BTreeSet<usize> = (0..64u64)
            .map(|tag| {
                let prepared = handler.prepare(&delivery(tag, b"x"));
                lane_of(BillingHandler::<Ledger>::lane_key(&prepared), tag, 8)
            })
            .collect();
        assert!(spread.len() > 1);
    }
}
