//! Our queues and exchanges, and their bindings to the upstream OpenStack exchanges.
//!
//! - main queue `<prefix><queue>`: quorum, dead-lettering to the dead exchange, with an explicit
//!   `x-delivery-limit` (RabbitMQ 3.10 has no default) against crash loops;
//! - retry exchange + queue `<prefix><queue>.retry`: messages wait `retry_delay_ms`, then
//!   dead-letter through the default exchange straight back to the main queue;
//! - dead exchange + classic queue `<prefix><queue>.dead`: where operators look;
//! - the main queue bound to each configured (exchange, routing key). OpenStack's own
//!   `notifications.info` queue is never declared, bound or consumed;
//! - in sharded mode (`bus.shards` = N > 0): the consistent-hash exchange `<prefix><queue>.shard`
//!   and N quorum queues `<prefix><queue>.shard.<i>`, each bound with weight 1, with a single
//!   active consumer, dead-lettering and a delivery limit like the main queue. The intake moves
//!   messages from the main queue to the exchange with the project id as routing key.

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
    Channel, ExchangeKind,
};

use tracing::warn;

use super::BusError;
use crate::config::{Binding, BusSettings, ConcertimSettings, Settings};

/// The names of everything this service owns on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The main queue.
    pub queue: String,
    /// The retry exchange (fanout).
    pub retry_exchange: String,
    /// The retry queue.
    pub retry_queue: String,
    /// The dead-letter exchange (fanout).
    pub dead_exchange: String,
    /// The dead-letter queue.
    pub dead_queue: String,
}

impl Names {
    /// The Concertim side's names: its queue `<queue>.concertim`, its retry exchange and queue
    /// `<queue>.concertim.retry`, and the shared dead-letter exchange and queue.
    pub fn concertim(bus: &BusSettings) -> Self {
        let main = Self::new(bus);
        let queue = format!("{}.concertim", main.queue);
        Self {
            retry_exchange: format!("{queue}.retry"),
            retry_queue: format!("{queue}.retry"),
            dead_exchange: main.dead_exchange,
            dead_queue: main.dead_queue,
            queue,
        }
    }

    /// The names derived from the settings.
    pub fn new(bus: &BusSettings) -> Self {
        let queue = format!("{}{}", bus.prefix, bus.queue);
        Self {
            retry_exchange: format!("{queue}.retry"),
            retry_queue: format!("{queue}.retry"),
            dead_exchange: format!("{queue}.dead"),
            dead_queue: format!("{queue}.dead"),
            queue,
        }
    }
}

/// The consistent-hash exchange of the sharded topology.
pub fn shard_exchange(bus: &BusSettings) -> String {
    format!("{}.shard", Names::new(bus).queue)
}

/// The shard queues of the sharded topology (none when sharding is off).
pub fn shard_queues(bus: &BusSettings) -> Vec<String> {
    let queue = Names::new(bus).queue;
    (0..bus.shards).map(|i| format!("{queue}.shard.{i}")).collect()
}

/// A shard queue's arguments: the main queue's, plus a single active consumer.
pub fn shard_queue_arguments(bus: &BusSettings, names: &Names) -> FieldTable {
    let mut args = main_queue_arguments(bus, names);
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args
}

/// The plugin the sharded topology needs.
pub const SHARD_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// The main queue's arguments.
pub fn main_queue_arguments(bus: &BusSettings, names: &Names) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-dead-letter-exchange".into(), text(&names.dead_exchange));
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(bus.delivery_limit)));
    args
}

/// A retry queue's arguments: quorum, with a TTL of `delay_ms` that dead-letters back to
/// `names.queue`.
pub fn retry_queue_arguments(delay_ms: u64, names: &Names) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(i64::try_from(delay_ms).unwrap_or(i64::MAX)));
    args.insert("x-dead-letter-exchange".into(), text(""));
    args.insert("x-dead-letter-routing-key".into(), text(&names.queue));
    args
}

/// Declares the Concertim queue (quorum, dead-lettering to the shared dead exchange, with the
/// same explicit delivery limit) and its retry exchange and queue, whose TTL sends messages
/// back to it. Billing publishes Concertim work to the queue through the default exchange.
///
/// # Errors
/// As [`declare`].
pub async fn declare_concertim(
    channel: &Channel,
    bus: &BusSettings,
    concertim: &ConcertimSettings,
) -> Result<Names, BusError> {
    let names = Names::concertim(bus);
    let queue_options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    declare_retry(channel, bus, &names, concertim.retry_delay_ms).await?;
    channel
        .queue_declare(names.queue.as_str().into(), queue_options, main_queue_arguments(bus, &Names::new(bus)))
        .await
        .map_err(ours(bus, format!("queue {}", names.queue)))?;
    Ok(names)
}

/// How a refused declaration of one of our own objects (`what`) reads: an object declared
/// with other arguments names the options to change.
fn ours(bus: &BusSettings, what: String) -> impl FnOnce(lapin::Error) -> BusError + '_ {
    move |e: lapin::Error| {
        classify(
            e,
            what,
            "it was declared with other arguments: delete it (it is ours) or choose another bus.prefix/bus.queue"
                .into(),
            bus,
        )
    }
}

/// Declares a retry exchange and its retry queue, bound (see [`retry_queue_arguments`]).
async fn declare_retry(channel: &Channel, bus: &BusSettings, names: &Names, delay_ms: u64) -> Result<(), BusError> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let queue_options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel
        .exchange_declare(names.retry_exchange.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .map_err(ours(bus, format!("exchange {}", names.retry_exchange)))?;
    channel
        .queue_declare(names.retry_queue.as_str().into(), queue_options, retry_queue_arguments(delay_ms, names))
        .await
        .map_err(ours(bus, format!("queue {}", names.retry_queue)))?;
    channel
        .queue_bind(
            names.retry_queue.as_str().into(),
            names.retry_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(ours(bus, format!("binding of {}", names.retry_queue)))?;
    Ok(())
}

/// Declares every queue, exchange and binding of our own (idempotent: the broker accepts
/// identical re-declarations). The bindings to OpenStack's exchanges are [`bind_upstream`]'s.
///
/// The classic dead-letter queue comes last. On a cluster it lives on one node, and while that
/// node is down the broker refuses to declare it (404, "home node … is down or inaccessible"):
/// that refusal is logged and the rest stands, so billing goes on from the other nodes (the
/// quorum queues have replicas there). It closes `channel`, so nothing can be declared on it
/// after this.
///
/// # Errors
/// [`BusError::Precondition`] naming the option to change when an object exists with other
/// settings; [`BusError::Broker`] otherwise. A failed declaration closes `channel`.
pub async fn declare(channel: &Channel, bus: &BusSettings) -> Result<Names, BusError> {
    let names = Names::new(bus);
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let queue_options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel
        .exchange_declare(names.dead_exchange.as_str().into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await
        .map_err(ours(bus, format!("exchange {}", names.dead_exchange)))?;
    declare_retry(channel, bus, &names, bus.retry_delay_ms).await?;
    channel
        .queue_declare(names.queue.as_str().into(), queue_options, main_queue_arguments(bus, &names))
        .await
        .map_err(ours(bus, format!("queue {}", names.queue)))?;
    if bus.shards > 0 {
        declare_shards(channel, bus, &names).await?;
    }
    // The dead-letter queue is classic, not quorum: operators read it with basic.get and return
    // what they do not take, and a classic queue puts returned messages back in their place
    // without counting deliveries (a quorum queue's delivery limit would drop dead letters after
    // enough reads). Last, because its node may be down (see the doc above).
    let dead = &names.dead_queue;
    match channel.queue_declare(dead.as_str().into(), queue_options, FieldTable::default()).await {
        Ok(_) => {}
        Err(e) if home_node_down(&e.to_string()) => {
            // FIXME(bus): while the node is down a message to dead-letter is returned unrouted
            // (NO_ROUTE), so it is not acknowledged and comes back after a reconnection; once it
            // reaches bus.delivery_limit the quorum queue dead-letters it itself, into the absent
            // queue, where it is lost. A dead-letter queue that survives a node needs a
            // replicated queue type.
            warn!(
                queue = %dead,
                error.message = %e,
                "the dead-letter queue's node is down; consuming without it until that node is back"
            );
            return Ok(names);
        }
        Err(e) => return Err(ours(bus, format!("queue {dead}"))(e)),
    }
    channel
        .queue_bind(
            dead.as_str().into(),
            names.dead_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(ours(bus, format!("binding of {dead}")))?;
    Ok(names)
}

/// Whether a broker's refusal says that the queue's node is down: a durable classic queue lives
/// on one node of a cluster, and the others answer 404 for it while that node is away.
fn home_node_down(error: &str) -> bool {
    error.contains("NOT_FOUND") && error.contains("home node") && error.contains("is down or inaccessible")
}

async fn declare_shards(channel: &Channel, bus: &BusSettings, names: &Names) -> Result<(), BusError> {
    let exchange = shard_exchange(bus);
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let queue_options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            let fix = if e.to_string().contains("invalid exchange type") {
                format!(
                    "enable the plugin on the broker: rabbitmq-plugins enable {SHARD_PLUGIN} (or set bus.shards = 0)"
                )
            } else {
                "it was declared with other arguments: delete it (it is ours) or choose another bus.prefix/bus.queue"
                    .into()
            };
            classify(e, format!("exchange {exchange}"), fix, bus)
        })?;
    let fix = || {
        "it was declared with other arguments: delete it when empty (it is ours) or choose another bus.prefix/bus.queue"
    };
    for queue in shard_queues(bus) {
        channel
            .queue_declare(queue.as_str().into(), queue_options, shard_queue_arguments(bus, names))
            .await
            .map_err(|e| classify(e, format!("queue {queue}"), fix().into(), bus))?;
        // The binding key of a consistent-hash exchange is the queue's weight.
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(e, format!("binding {exchange} -> {queue}"), fix().into(), bus))?;
    }
    Ok(())
}

/// Declares everything of ours the configuration describes on `channel`: the main topology
/// and, when Concertim is configured, its queues.
///
/// # Errors
/// As [`declare`] and [`declare_concertim`].
pub async fn declare_ours(channel: &Channel, settings: &Settings) -> Result<(), BusError> {
    // The Concertim queues first: [`declare`] ends with the dead-letter queue, whose absent node
    // closes the channel. They only name the dead-letter exchange, which need not exist yet.
    if let Some(concertim) = &settings.concertim {
        declare_concertim(channel, &settings.bus, concertim).await?;
    }
    declare(channel, &settings.bus).await?;
    Ok(())
}

/// The whole topology, once, on a connection of its own (`topology declare`): ours, then the
/// bindings to every upstream exchange OpenStack has declared. Returns the bindings whose
/// exchange does not exist yet.
///
/// # Errors
/// When the broker cannot be reached or refuses a declaration.
pub async fn declare_all(settings: &Settings) -> Result<Vec<Binding>, BusError> {
    let bus = &settings.bus;
    let connection = super::connect(bus, "concertim-billing topology").await?;
    let declared = async {
        let channel = connection.create_channel().await.map_err(super::broker_error(&bus.url))?;
        declare_ours(&channel, settings).await?;
        bind_upstream(bus).await
    }
    .await;
    let _ = connection.close(200, "done".into()).await;
    declared
}

/// Binds our main queue to each upstream exchange of `bus.bindings` that exists, and returns
/// the bindings whose exchange does not exist yet (OpenStack declares it when it first
/// publishes: see [`check_upstream`]). Each check runs on a channel of its own, on a
/// connection of its own after an absent one (a failed passive declare spoils both).
///
/// # Errors
/// When the broker cannot be reached or refuses a binding.
pub async fn bind_upstream(bus: &BusSettings) -> Result<Vec<Binding>, BusError> {
    bind_some(bus, &bus.bindings).await
}

/// Whether an upstream exchange exists, checked on a connection of its own (a failed passive
/// declare spoils its channel and connection).
///
/// # Errors
/// When the broker cannot be reached.
pub async fn upstream_exists(bus: &BusSettings, exchange: &str) -> Result<bool, BusError> {
    let connection = super::connect(bus, "concertim-billing check").await?;
    let channel =
        connection.create_channel().await.map_err(|source| BusError::Broker { url: bus.url.redacted(), source })?;
    let checked = check_upstream(&channel, exchange, bus).await;
    let _ = connection.close(200, "checked".into()).await;
    match checked {
        Ok(()) => Ok(true),
        Err(BusError::UpstreamAbsent { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// [`bind_upstream`] for some of the bindings.
///
/// # Errors
/// As [`bind_upstream`].
pub async fn bind_some(bus: &BusSettings, bindings: &[Binding]) -> Result<Vec<Binding>, BusError> {
    let queue = Names::new(bus).queue;
    let broker = |source| BusError::Broker { url: bus.url.redacted(), source };
    let mut absent = Vec::new();
    let mut connection: Option<lapin::Connection> = None;
    for binding in bindings {
        let open = match connection.take() {
            Some(open) => open,
            None => super::connect(bus, "concertim-billing bind").await?,
        };
        let channel = open.create_channel().await.map_err(broker)?;
        match check_upstream(&channel, &binding.exchange, bus).await {
            Ok(()) => {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        binding.exchange.as_str().into(),
                        binding.routing_key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(broker)?;
                let _ = channel.close(200, "bound".into()).await;
                connection = Some(open);
            }
            Err(BusError::UpstreamAbsent { .. }) => {
                absent.push(binding.clone());
                let _ = open.close(200, "checked".into()).await;
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(open) = connection {
        let _ = open.close(200, "bound".into()).await;
    }
    Ok(absent)
}

/// Checks that an upstream exchange exists, never creating it: a passive declare, which the
/// broker answers NOT_FOUND (closing the channel) when it is absent. OpenStack's publishers
/// declare their exchanges with the durability their `amqp_durable_queues` says; one created
/// here first with another would make every one of their publishes fail with
/// PRECONDITION_FAILED, for every consumer, Ceilometer included.
///
/// # Errors
/// [`BusError::UpstreamAbsent`] (transient: the caller waits and tries again) when it does not
/// exist; the channel is then closed.
pub async fn check_upstream(channel: &Channel, exchange: &str, bus: &BusSettings) -> Result<(), BusError> {
    let passive = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
    match channel.exchange_declare(exchange.into(), ExchangeKind::Topic, passive, FieldTable::default()).await {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().contains("NOT_FOUND") || e.to_string().contains("NotFound") => {
            Err(BusError::UpstreamAbsent { exchange: exchange.to_owned() })
        }
        Err(e) => Err(BusError::Broker { url: bus.url.redacted(), source: e }),
    }
}

fn classify(error: lapin::Error, what: String, fix: String, bus: &BusSettings) -> BusError {
    let text = error.to_string();
    if text.contains("PRECONDITION_FAILED")
        || text.contains("PreconditionFailed")
        || text.contains("inequivalent arg")
        || text.contains("invalid exchange type")
    {
        BusError::Precondition { what, detail: text, fix }
    } else {
        BusError::Broker { url: bus.url.redacted(), source: error }
    }
}

/// A human description of the topology, for `topology show`.
pub fn describe(bus: &BusSettings) -> String {
    let names = Names::new(bus);
    let mut out = String::new();
    out.push_str(&format!(
        "queue    {}  quorum, durable, x-dead-letter-exchange={}, x-delivery-limit={}\n",
        names.queue, names.dead_exchange, bus.delivery_limit
    ));
    for b in &bus.bindings {
        out.push_str(&format!(
            "  bound  {} (topic, OpenStack's own; checked, never created) routing key {}\n",
            b.exchange, b.routing_key
        ));
    }
    out.push_str(&format!(
        "retry    exchange {} (fanout) -> queue {}  quorum, x-message-ttl={} ms, then back to {}\n",
        names.retry_exchange, names.retry_queue, bus.retry_delay_ms, names.queue
    ));
    out.push_str(&format!(
        "dead     exchange {} (fanout) -> queue {}  classic (read and returned in place by dlq)\n",
        names.dead_exchange, names.dead_queue
    ));
    let shards = shard_queues(bus);
    if !shards.is_empty() {
        out.push_str(&format!(
            "intake   {} -> exchange {} (x-consistent-hash, routing key = project id; plugin {SHARD_PLUGIN}); one replica at a time, holding the exclusive queue {}.intake; the others ask every {} ms\n",
            names.queue,
            shard_exchange(bus),
            names.queue,
            bus.intake_standby_ms
        ));
        for queue in shards {
            out.push_str(&format!(
                "shard    {queue}  quorum, durable, x-single-active-consumer, x-dead-letter-exchange={}, x-delivery-limit={}, bound with weight 1\n",
                names.dead_exchange, bus.delivery_limit
            ));
        }
    }
    out
}

/// The Concertim queues, for `topology show` when Concertim is configured.
pub fn describe_concertim(bus: &BusSettings, concertim: &ConcertimSettings) -> String {
    let names = Names::concertim(bus);
    let main = Names::new(bus);
    format!(
        "concertim queue {}  quorum, durable, x-dead-letter-exchange={}, x-delivery-limit={} (billing publishes to it through the default exchange)\n\
         concertim retry exchange {} (fanout) -> queue {}  quorum, x-message-ttl={} ms, then back to {}\n",
        names.queue, main.dead_exchange, bus.delivery_limit, names.retry_exchange, names.retry_queue,
        concertim.retry_delay_ms, names.queue
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_prefix_and_queue_and_never_touch_notifications_info() {
        let bus = BusSettings { prefix: "t1-".into(), ..BusSettings::default() };
        let names = Names::new(&bus);
        assert_eq!(names.queue, "t1-concertim-billing");
        assert_eq!(names.retry_queue, "t1-concertim-billing.retry");
        assert_eq!(names.dead_exchange, "t1-concertim-billing.dead");
        assert!(describe(&bus).lines().all(|l| !l.contains("queue notifications.info")));
    }

    #[test]
    fn sharding_adds_an_exchange_and_single_active_consumer_queues_only_when_asked() {
        let off = BusSettings::default();
        assert!(shard_queues(&off).is_empty());
        assert!(!describe(&off).contains("shard"));
        let on = BusSettings { shards: 3, ..BusSettings::default() };
        assert_eq!(
            shard_queues(&on),
            ["concertim-billing.shard.0", "concertim-billing.shard.1", "concertim-billing.shard.2"]
        );
        assert_eq!(shard_exchange(&on), "concertim-billing.shard");
        let args = shard_queue_arguments(&on, &Names::new(&on));
        assert_eq!(args.inner().get("x-single-active-consumer"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(args.inner().get("x-delivery-limit"), Some(&AMQPValue::LongLongInt(20)));
        assert_eq!(describe(&on).lines().filter(|l| l.starts_with("shard ")).count(), 3);
    }

    #[test]
    fn only_a_refusal_naming_a_down_home_node_counts_as_the_dead_letter_queue_being_away() {
        let cases = [
            (
                "protocol error: AMQP soft error: NOT-FOUND: NOT_FOUND - home node 'rabbit-a@ctl1' of durable queue \
                 'concertim-billing.dead' in vhost '/' is down or inaccessible",
                true,
                "RabbitMQ 3.10's answer for a classic queue on a stopped node",
            ),
            ("NOT_FOUND - no queue 'concertim-billing.dead' in vhost '/'", false, "a missing queue"),
            (
                "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'concertim-billing.dead'",
                false,
                "another queue type",
            ),
            ("ACCESS_REFUSED - access to queue 'concertim-billing.dead' refused", false, "no permission"),
        ];
        for (error, down, case) in cases {
            assert_eq!(home_node_down(error), down, "{case}");
        }
    }

    #[test]
    fn the_main_queue_sets_an_explicit_delivery_limit_and_dead_letter_exchange() {
        let bus = BusSettings::default();
        let args = main_queue_arguments(&bus, &Names::new(&bus));
        assert_eq!(args.inner().get("x-delivery-limit"), Some(&AMQPValue::LongLongInt(20)));
        assert!(args.contains_key("x-dead-letter-exchange"));
    }
}
