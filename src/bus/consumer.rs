//! The consumers: a queue → lanes → a [`Handler`] → [`ack`](super::ack), with reconnection and
//! graceful shutdown.
//!
//! Two handlers (made above the bus, in the `handle` module) run on this machinery, each on its own
//! connection: billing, on our main queue, and, when Concertim is configured, the Concertim
//! updates on their own queue. A billing message's follow-up is published, confirmed, to the
//! Concertim queue before the message is acknowledged; billing never waits for Concertim itself.
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
    batch::Acknowledger,
    broker_error, connect, intake, topology, BusError, Names,
};
use crate::{
    class::{ErrorClass, Label},
    config::{BusSettings, Settings},
    retry,
    telemetry::{self, Health},
};

/// Consumes until `shutdown` is cancelled, reconnecting whenever the broker goes away. Returns
/// once in-flight messages finished (or the shutdown deadline passed) and the connection closed.
/// `billing` handles the main queue (or the shards, and picks each message's shard); when
/// `settings` configure Concertim, `concertim` handles its queue alongside, on a connection of
/// its own. `health` hears whether billing is consuming (what `/readyz` answers).
///
/// # Errors
/// Only a permanent problem ends the loop: a topology that conflicts with what exists on the
/// broker ([`BusError::Precondition`], whose message names the option to change), or Concertim
/// configured without its handler ([`BusError::Config`]).
pub async fn run<H: Handler, C: Handler>(
    settings: &Settings,
    billing: Arc<H>,
    concertim: Option<Arc<C>>,
    shutdown: CancellationToken,
    health: Arc<Health>,
) -> Result<(), BusError> {
    let bus = &settings.bus;
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
        let result = intake_loop(bus, &billing, &stop, &health).await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let billing_consumer = Consumer {
        queues,
        upstream: true,
        names: Names::new(bus),
        tag: "concertim-billing",
        prefetch: bus.prefetch,
        lanes: bus.lanes,
        max_attempts: bus.max_attempts,
        follow_ups: settings.concertim.as_ref().map(|_| Names::concertim(bus).queue),
    };
    let billing = async {
        let result = consume(bus, settings, billing_consumer, Arc::clone(&billing), &stop, Some(&health)).await;
        if result.is_err() {
            stop.cancel();
        }
        result
    };
    let Some(concertim_settings) = &settings.concertim else {
        let (billing, intake) = tokio::join!(billing, intake);
        return billing.and(intake);
    };
    let Some(handler) = concertim else {
        return Err(BusError::Config { detail: "concertim is configured but has no handler".to_owned() });
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
        follow_ups: None,
    };
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
    /// Where its handler's follow-ups go.
    follow_ups: Option<String>,
}

/// What a consumer does with its messages (the billing and Concertim handlers live in the
/// `handle` module).
pub trait Handler: Send + Sync + 'static {
    /// A delivery read far enough to choose its lane and name its span.
    type Prepared: Send + 'static;

    /// Reads a delivery's body.
    fn prepare(&self, body: &[u8]) -> Self::Prepared;

    /// The lane key (a project), when there is one.
    fn lane_key(prepared: &Self::Prepared) -> Option<&str>;

    /// The span every log line of the message carries.
    fn span(prepared: &Self::Prepared) -> tracing::Span;

    /// Runs the message to its verdict, retrying transient failures in process.
    fn process(self: &Arc<Self>, prepared: Self::Prepared, redelivered: bool)
        -> impl Future<Output = Processed> + Send;
}

/// A message's verdict, its metric label, and the follow-up to publish to the Concertim queue
/// before acknowledging it.
#[derive(Debug)]
pub struct Processed {
    /// What becomes of the message on the broker.
    pub verdict: Verdict,
    /// Its label in metrics and logs.
    pub label: Label,
    /// Published, confirmed, to the Concertim queue before the message is acknowledged.
    pub follow_up: Option<FollowUp>,
}

/// A message for the Concertim queue.
#[derive(Debug)]
pub struct FollowUp {
    /// Its `message_id` (the notification's).
    pub message_id: String,
    /// Its body.
    pub body: Vec<u8>,
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

/// The sharded topology's intake, reconnecting like the consumers; `router` picks each
/// message's shard.
async fn intake_loop<H: Handler>(
    bus: &BusSettings,
    router: &Arc<H>,
    shutdown: &CancellationToken,
    health: &Health,
) -> Result<(), BusError> {
    let what = format!("{} (intake)", Names::new(bus).queue);
    reconnecting(bus, &what, shutdown, || async {
        Ok(match intake::session(bus, router, shutdown, health).await? {
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
    let Opened { connection, _watcher, publisher, consuming, tags, streams } = open(bus, settings, consumer).await?;
    let mut deliveries = Deliveries::new(streams, consumer.prefetch);
    info!(queue = %consumer.queues.join(", "), url = %bus.url, lanes = consumer.lanes, "consuming");
    if let Some(health) = health {
        health.set_consuming(true);
    }

    let trouble = CancellationToken::new();
    let batch = bus.ack_batch.min(usize::from(consumer.prefetch));
    let (acknowledger, acks) = Acknowledger::start(batch, bus.ack_delay(), trouble.clone());
    let settler = Settler::new(publisher, consumer.names.clone(), consumer.max_attempts, acks)
        .with_follow_ups(consumer.follow_ups.clone());
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
                // Bounded: on a connection the broker no longer answers, a cancel waits forever.
                for tag in &tags {
                    let cancel = consuming.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, cancel).await;
                }
                break End::Shutdown;
            }
            () = trouble.cancelled() => break End::Lost { consumed },
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    consumed = true;
                    metrics::gauge!(telemetry::IN_FLIGHT).increment(1.0);
                    let prepared = handler.prepare(&delivery.data);
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
    // The lanes hold the settler's clones; the acknowledger ends once they are all gone.
    drop(settler);
    match end {
        End::Shutdown => {
            let drained = tokio::time::timeout(bus.shutdown_deadline(), async {
                while lanes.join_next().await.is_some() {}
                // What the lanes settled is acknowledged before the connection closes.
                acknowledger.finish().await;
            })
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
    match end {
        End::Shutdown => {
            close(&connection, "shutting down").await;
            info!(queue = %consumer.queues.join(", "), "stopped consuming");
        }
        // A session lost while its connection is up (a publish not confirmed, a hand-over
        // refused) closes it: left open, it would keep its consumer, and the messages delivered
        // to it, until the process exits.
        End::Lost { .. } => close(&connection, "reconnecting").await,
    }
    Ok(end)
}

/// How long closing a connection (or cancelling a consumer) may take.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes a connection that is given up, waiting at most [`CLOSE_TIMEOUT`]. lapin keeps a
/// connection, its channels and its consumers alive until it is closed, dropped or not: the
/// broker goes on delivering up to `prefetch` messages to each such consumer, which nobody
/// processes, and they wait there until the process exits.
async fn close(connection: &lapin::Connection, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, reason.into())).await;
}

/// `work` on a connection just opened, within `limit`; when it fails or takes longer, the
/// connection is closed (see [`close`]), so that nothing it set up outlives the attempt.
async fn set_up<T>(
    connection: &lapin::Connection,
    limit: std::time::Duration,
    url: &crate::config::SecretUrl,
    work: impl Future<Output = Result<T, BusError>>,
) -> Result<T, BusError> {
    let done = super::answered_within(limit, url, "the consumer's set-up", work).await;
    if done.is_err() {
        close(connection, "set-up failed").await;
    }
    done
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

/// Connects, declares the topology, binds upstream and starts consuming `consumer`'s queues,
/// within [`super::SETUP_TIMEOUT`] once connected. A set-up that fails or times out closes its
/// connection: on a cluster whose queue has lost its quorum, `basic.consume` takes effect only
/// once the quorum is back, and a consumer left behind on an abandoned connection would take
/// messages it never processes.
async fn open(bus: &BusSettings, settings: &Settings, consumer: &Consumer) -> Result<Opened, BusError> {
    // Bounded node by node.
    let connection = connect(bus, consumer.tag).await?;
    let opened = set_up(&connection, super::SETUP_TIMEOUT, &bus.url, consume_on(&connection, bus, settings, consumer));
    let (_watcher, publisher, consuming, tags, streams) = opened.await?;
    Ok(Opened { connection, _watcher, publisher, consuming, tags, streams })
}

/// What [`open`] sets up on its connection: the upstream watcher, the publisher channel, the
/// consuming channel, the consumer tags and their streams.
type SetUp = (Option<AbortOnDrop>, lapin::Channel, lapin::Channel, Vec<String>, Vec<lapin::Consumer>);

async fn consume_on(
    connection: &lapin::Connection,
    bus: &BusSettings,
    settings: &Settings,
    consumer: &Consumer,
) -> Result<SetUp, BusError> {
    let broker = broker_error(&bus.url);
    let setup = connection.create_channel().await.map_err(&broker)?;
    topology::declare_ours(&setup, settings).await?;
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
    Ok((_watcher, publisher, consuming, tags, streams))
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
    let Processed { verdict, label, follow_up } = handler.process(prepared, redelivered).await;
    if let Some(follow_up) = follow_up {
        // The Concertim work is on its queue before the notification is acknowledged: a crash
        // in between redelivers the notification, whose billing is idempotent.
        if let Err(e) = settler.forward(&follow_up).await {
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

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;
    use crate::config::SecretUrl;

    /// Reads one frame: its type, channel, and the class and method of a method frame.
    async fn frame(socket: &mut TcpStream) -> Option<(u8, u16, (u16, u16))> {
        let mut header = [0u8; 7];
        socket.read_exact(&mut header).await.ok()?;
        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        socket.read_exact(&mut payload).await.ok()?;
        let method = if header[0] == 1 && size >= 4 {
            (u16::from_be_bytes([payload[0], payload[1]]), u16::from_be_bytes([payload[2], payload[3]]))
        } else {
            (0, 0)
        };
        Some((header[0], u16::from_be_bytes([header[1], header[2]]), method))
    }

    /// A method frame on channel 0.
    fn method(class: u16, method: u16, arguments: &[u8]) -> Vec<u8> {
        let mut payload = [class.to_be_bytes(), method.to_be_bytes()].concat();
        payload.extend_from_slice(arguments);
        let mut out = vec![1, 0, 0];
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&payload);
        out.push(0xCE);
        out
    }

    #[tokio::test]
    async fn a_set_up_that_takes_too_long_closes_its_connection_so_no_consumer_outlives_it() {
        // A broker that opens the connection and then never answers Channel.Open, as a node
        // does for a queue without a quorum; it reports whether the client sent Connection.Close.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let broker = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut protocol = [0u8; 8];
            socket.read_exact(&mut protocol).await.unwrap();
            socket.write_all(&crate::bus::tests::connection_start()).await.unwrap();
            assert_eq!(frame(&mut socket).await.map(|f| f.2), Some((10, 11)), "Start-Ok");
            // Tune: 2047 channels, 128 KiB frames, no heartbeat.
            let tune = [&2047u16.to_be_bytes()[..], &131_072u32.to_be_bytes(), &0u16.to_be_bytes()].concat();
            socket.write_all(&method(10, 30, &tune)).await.unwrap();
            assert_eq!(frame(&mut socket).await.map(|f| f.2), Some((10, 31)), "Tune-Ok");
            assert_eq!(frame(&mut socket).await.map(|f| f.2), Some((10, 40)), "Open");
            socket.write_all(&method(10, 41, &[0])).await.unwrap();
            while let Some((_, channel, (class, id))) = frame(&mut socket).await {
                if (channel, class, id) == (0, 10, 50) {
                    socket.write_all(&method(10, 51, &[])).await.unwrap();
                    return true;
                }
            }
            false
        });
        let url = SecretUrl::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"));
        let connection =
            lapin::Connection::connect(url.expose(), lapin::ConnectionProperties::default()).await.unwrap();

        let limit = std::time::Duration::from_millis(300);
        let opening = async { connection.create_channel().await.map_err(broker_error(&url)) };
        let error = set_up(&connection, limit, &url, opening).await.expect_err("the set-up times out");

        assert!(matches!(error, BusError::NoAnswer { .. }), "{error}");
        let closed = tokio::time::timeout(CLOSE_TIMEOUT, broker).await.expect("the broker hears from the client");
        assert!(closed.unwrap(), "the client closed the connection it gave up");
    }

    #[test]
    fn one_lane_key_always_takes_the_same_lane_and_messages_without_one_spread_out() {
        let lanes: Vec<usize> = (0..20u64).map(|tag| lane_of(Some("p1"), tag, 8)).collect();
        assert!(lanes.iter().all(|l| *l == lanes[0]), "{lanes:?}");
        let spread: std::collections::BTreeSet<usize> = (0..64u64).map(|tag| lane_of(None, tag, 8)).collect();
        assert!(spread.len() > 1);
    }
}
