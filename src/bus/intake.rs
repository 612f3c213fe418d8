//! The intake of the sharded topology: one replica at a time moves the main queue's messages to
//! the consistent-hash exchange, with the project id as routing key, so that each project's
//! messages land on one shard queue, in the order they arrived.
//!
//! One replica at a time: the intake holds a lock, the exclusive queue `<queue>.intake`, before
//! it consumes the main queue, on the same connection. The broker lets one connection declare
//! an exclusive queue and deletes it when that connection closes, which also returns the
//! intake's unacknowledged messages; the other replicas stand by and try again every
//! `bus.intake_standby_ms`. (Quorum queues do not enforce exclusive consumers, and a
//! single-active-consumer argument on the main queue would make sharding impossible to switch
//! on without redeclaring, and so emptying, the main queue.)
//!
//! The copies are published on a second connection: RabbitMQ's flow control throttles a
//! connection that publishes faster than the shards take, and on the consuming connection that
//! would hold up the acknowledgements too, stalling both.
//!
//! Publishes are pipelined: a second task waits for the broker's confirms in publish order and
//! acknowledges each message once its copy is confirmed, so nothing is lost in between. A crash
//! between the confirm and the ack moves a message twice, which billing absorbs (every action
//! is idempotent).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_lite::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions},
    types::FieldTable,
    Confirmation, PublisherConfirm,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{ack, broker_error, connect, consumer::Handler, topology, BusError, Names};
use crate::{config::BusSettings, telemetry, telemetry::Health};

const TAG: &str = "concertim-billing-intake";
const PUBLISH_TAG: &str = "concertim-billing-intake-publish";

/// AMQP `RESOURCE_LOCKED`: an exclusive queue another connection owns.
const RESOURCE_LOCKED: u16 = 405;

/// How an intake session ended.
pub(super) enum IntakeEnd {
    /// Shutdown was asked for.
    Shutdown,
    /// The broker went away, or a publish was not confirmed: reconnect.
    Lost,
}

/// The routing key of a message: its lane key (the project id), so the consistent-hash
/// exchange sends every message of a project to the same shard. Messages without a usable
/// project (invalid ones, events of no project) spread by delivery tag; the shard's consumer
/// deals with them.
pub(super) fn routing_key<H: Handler>(router: &H, delivery: &Delivery) -> String {
    let prepared = router.prepare(&delivery.data);
    match H::lane_key(&prepared) {
        // A routing key is a short string: at most 255 bytes.
        Some(project) if !project.is_empty() && project.len() <= 255 => project.to_owned(),
        _ => delivery.delivery_tag.to_string(),
    }
}

/// One connection's worth of intake: stand by until the lock is granted, then move messages
/// until shutdown or a broker failure.
pub(super) async fn session<H: Handler>(
    bus: &BusSettings,
    router: &Arc<H>,
    shutdown: &CancellationToken,
    health: &Health,
) -> Result<IntakeEnd, BusError> {
    let broker = broker_error(&bus.url);
    let names = Names::new(bus);
    let exchange = topology::shard_exchange(bus);
    let connection = super::answered(&bus.url, "the intake's set-up", async {
        let connection = connect(bus, TAG).await?;
        let setup = connection.create_channel().await.map_err(&broker)?;
        topology::declare(&setup, bus).await?;
        Ok(connection)
    })
    .await?;

    let lock = format!("{}.intake", names.queue);
    let standby = Duration::from_millis(bus.intake_standby_ms);
    let mut standing_by = false;
    // Since when the lock's holder moves nothing (see `main_queue`).
    let mut stuck_since: Option<Instant> = None;
    let mut takeover = false;
    loop {
        match take_lock(&connection, &lock).await {
            Ok(true) => break,
            // Another connection holds the lock (the refusal closed only that channel).
            Ok(false) => {
                if !standing_by {
                    info!(queue = %names.queue, "another replica is the intake; standing by");
                    standing_by = true;
                }
                match main_queue(&connection, bus, &names.queue).await? {
                    (waiting, 0) if waiting > 0 => {
                        let since = *stuck_since.get_or_insert_with(Instant::now);
                        // Seen twice: not a holder between taking the lock and consuming.
                        if since.elapsed() >= standby {
                            health.set_intake_stuck(Some((since, waiting)));
                        }
                        if since.elapsed() >= Duration::from_millis(bus.intake_takeover_ms) {
                            warn!(
                                queue = %names.queue,
                                waiting,
                                stuck_s = since.elapsed().as_secs(),
                                "the intake lock's holder moves nothing; taking over the main queue without the lock"
                            );
                            takeover = true;
                            break;
                        }
                    }
                    _ => {
                        stuck_since = None;
                        health.set_intake_stuck(None);
                    }
                }
            }
            Err(e) => return Err(broker(e)),
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                health.set_intake_stuck(None);
                let _ = connection.close(200, "shutting down".into()).await;
                return Ok(IntakeEnd::Shutdown);
            }
            () = tokio::time::sleep(standby) => {}
        }
    }
    health.set_intake_stuck(None);
    let (publishing, publisher, consuming, mut deliveries) = super::answered(&bus.url, "the intake's set-up", async {
        let publishing = connect(bus, PUBLISH_TAG).await?;
        let publisher = publishing.create_channel().await.map_err(&broker)?;
        publisher.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.map_err(&broker)?;
        let consuming = connection.create_channel().await.map_err(&broker)?;
        consuming.basic_qos(bus.prefetch, BasicQosOptions::default()).await.map_err(&broker)?;
        let deliveries = consuming
            .basic_consume(
                names.queue.as_str().into(),
                TAG.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(&broker)?;
        Ok((publishing, publisher, consuming, deliveries))
    })
    .await?;
    info!(queue = %names.queue, exchange = %exchange, "intake: moving the main queue to the shards");
    metrics::gauge!(telemetry::INTAKE_ACTIVE).set(1.0);

    let trouble = CancellationToken::new();
    let (confirms, pending) = mpsc::channel(usize::from(bus.prefetch.max(1)));
    let acker = tokio::spawn(confirm_then_ack(pending, trouble.clone()));
    let mut recheck = tokio::time::interval(standby);
    let end = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                let _ = consuming.basic_cancel(TAG.into(), BasicCancelOptions::default()).await;
                break IntakeEnd::Shutdown;
            }
            () = trouble.cancelled() => break IntakeEnd::Lost,
            // Taken over: take the lock as soon as it is free, and hand the main queue back as
            // soon as its holder consumes.
            _ = recheck.tick(), if takeover => match take_lock(&connection, &lock).await {
                Ok(true) => {
                    info!(queue = %names.queue, "the intake lock is free again and this replica holds it");
                    takeover = false;
                }
                Ok(false) => {
                    if main_queue(&connection, bus, &names.queue).await.is_ok_and(|(_, consumers)| consumers > 1) {
                        info!(queue = %names.queue, "the intake lock's holder consumes again; handing the main queue back");
                        break IntakeEnd::Lost;
                    }
                }
                Err(e) => {
                    warn!(error.message = %e, "intake: cannot check the lock; reconnecting");
                    break IntakeEnd::Lost;
                }
            },
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => {
                    let key = routing_key(&**router, &delivery);
                    let properties = ack::with_original_route(&delivery, &names.queue);
                    let published = publisher
                        .basic_publish(
                            exchange.as_str().into(),
                            key.as_str().into(),
                            BasicPublishOptions::default(),
                            &delivery.data,
                            properties,
                        )
                        .await;
                    match published {
                        Ok(confirm) => {
                            if confirms.send((confirm, delivery)).await.is_err() {
                                break IntakeEnd::Lost;
                            }
                        }
                        Err(e) => {
                            warn!(error.message = %e, "intake: cannot publish to the shards; reconnecting");
                            break IntakeEnd::Lost;
                        }
                    }
                }
                Some(Err(e)) => {
                    warn!(error.message = %e, "intake: the consumer failed");
                    break IntakeEnd::Lost;
                }
                None => break IntakeEnd::Lost,
            },
        }
    };
    metrics::gauge!(telemetry::INTAKE_ACTIVE).set(0.0);
    drop(confirms);
    match end {
        // What was published is confirmed and acknowledged before the connection closes.
        IntakeEnd::Shutdown => {
            if tokio::time::timeout(bus.shutdown_deadline(), acker).await.is_err() {
                warn!("intake: confirms did not arrive within the shutdown deadline; the broker will redeliver those messages");
            }
            let _ = connection.close(200, "shutting down".into()).await;
            let _ = publishing.close(200, "shutting down".into()).await;
            info!("intake stopped");
        }
        // Unacknowledged messages go back to the main queue with the connection, which must
        // really close: while it lives, its exclusive consumer locks every replica out.
        IntakeEnd::Lost => {
            acker.abort();
            let closing = async {
                let _ = connection.close(320, "reconnecting".into()).await;
                let _ = publishing.close(320, "reconnecting".into()).await;
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), closing).await;
        }
    }
    Ok(end)
}

/// Tries to take the intake lock (the exclusive queue `lock`) on a channel of its own: `false`
/// when another connection holds it.
async fn take_lock(connection: &lapin::Connection, lock: &str) -> Result<bool, lapin::Error> {
    let channel = connection.create_channel().await?;
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
    match channel.queue_declare(lock.into(), exclusive, FieldTable::default()).await {
        Ok(_) => Ok(true),
        Err(e) if super::amqp_code(&e) == Some(RESOURCE_LOCKED) => {
            debug!(error.message = %e, "intake lock held elsewhere");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The main queue's waiting messages and consumers (a passive declare, on a channel of its own
/// since a failure closes it).
async fn main_queue(connection: &lapin::Connection, bus: &BusSettings, queue: &str) -> Result<(u32, u32), BusError> {
    let channel = connection.create_channel().await.map_err(broker_error(&bus.url))?;
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared = channel.queue_declare(queue.into(), passive, FieldTable::default()).await;
    let _ = channel.close(200, "checked".into()).await;
    let declared = declared.map_err(broker_error(&bus.url))?;
    Ok((declared.message_count(), declared.consumer_count()))
}

/// Acknowledges each moved message once the broker confirmed its copy, in publish order.
async fn confirm_then_ack(mut pending: mpsc::Receiver<(PublisherConfirm, Delivery)>, trouble: CancellationToken) {
    while let Some((confirm, delivery)) = pending.recv().await {
        let confirmed = tokio::time::timeout(super::CONFIRM_TIMEOUT, confirm).await;
        let acked = match confirmed {
            Ok(Ok(Confirmation::Ack(_))) => ack::ack(delivery).await.is_ok(),
            _ => false,
        };
        if !acked {
            // Left unacknowledged, so the broker hands it (and what follows) to the next intake.
            warn!("intake: a move was not confirmed; reconnecting");
            trouble.cancel();
            return;
        }
        metrics::counter!(telemetry::INTAKE_MOVED).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::consumer::Processed;

    /// Routes by the body itself, when it is a word.
    struct ByBody;

    impl Handler for ByBody {
        type Prepared = Option<String>;

        fn prepare(&self, body: &[u8]) -> Option<String> {
            String::from_utf8(body.to_vec()).ok().filter(|s| s.chars().all(char::is_alphanumeric))
        }

        fn lane_key(prepared: &Option<String>) -> Option<&str> {
            prepared.as_deref()
        }

        fn span(_: &Option<String>) -> tracing::Span {
            tracing::Span::none()
        }

        async fn process(self: &Arc<Self>, _: Option<String>, _: bool) -> Processed {
            unreachable!("the intake only routes")
        }
    }

    #[test]
    fn a_message_is_routed_by_its_lane_key_and_one_without_by_its_delivery_tag() {
        let delivery =
            |tag, body: &[u8]| Delivery::mock(tag, "nova".into(), "notifications.info".into(), false, body.to_vec());
        assert_eq!(routing_key(&ByBody, &delivery(7, b"p1")), "p1");
        assert_eq!(routing_key(&ByBody, &delivery(8, b"{")), "8");
        assert_eq!(routing_key(&ByBody, &delivery(9, b"")), "9");
        assert_eq!(routing_key(&ByBody, &delivery(10, "a".repeat(256).as_bytes())), "10");
    }
}
