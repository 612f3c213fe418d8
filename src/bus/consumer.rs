//! The consumer: our queue → lanes → executor → [`ack`](super::ack), with reconnection and
//! graceful shutdown.
//!
//! One project's messages always go to the same lane and are handled there one after the other,
//! in order; different projects are handled concurrently. A transient failure is retried in
//! process (see [`crate::retry`]), then through the retry queue. A handler that panics loses
//! only its message, which is dead-lettered. When the connection or a channel fails, the
//! session ends, lanes finish what they hold (their acks fail, so the broker redelivers those
//! messages), and a new session connects with backoff and declares the topology again.

use std::{
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
    broker_error, connect, topology, BusError,
};
use crate::{
    billing::Billing,
    class::ErrorClass,
    config::{BackoffSettings, BusSettings},
    event::Notification,
    executor::{Executor, Outcome},
    notification::DecodeError,
    replay::chain,
    retry,
    telemetry::{self, Health},
};

const CONSUMER_TAG: &str = "concertim-billing";

/// Consumes until `shutdown` is cancelled, reconnecting whenever the broker goes away. Returns
/// once in-flight messages finished (or the shutdown deadline passed) and the connection closed.
///
/// # Errors
/// Only a permanent problem ends the loop: a topology that conflicts with what exists on the
/// broker ([`BusError::Precondition`], whose message names the option to change).
pub async fn run<B: Billing + 'static>(
    bus: &BusSettings,
    executor: Arc<Executor<B>>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    run_with_health(bus, executor, shutdown, Arc::new(Health::default())).await
}

/// As [`run`], reporting into `health` whether it is consuming (what `/readyz` answers).
///
/// # Errors
/// As [`run`].
pub async fn run_with_health<B: Billing + 'static>(
    bus: &BusSettings,
    executor: Arc<Executor<B>>,
    shutdown: CancellationToken,
    health: Arc<Health>,
) -> Result<(), BusError> {
    let mut reconnect = retry::reconnect(std::time::Duration::from_millis(bus.reconnect_max_ms));
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let session = session(bus, &executor, &shutdown, &health).await;
        health.set_consuming(false);
        match session {
            Ok(End::Shutdown) => return Ok(()),
            Ok(End::Lost { consumed }) => {
                if consumed {
                    reconnect.reset();
                }
                warn!("lost the broker; reconnecting");
            }
            Err(e) if e.class() == ErrorClass::Permanent => return Err(e),
            Err(e) => warn!(error.message = %e, "cannot consume; retrying"),
        }
        let wait = reconnect.next_wait().unwrap_or(std::time::Duration::from_millis(bus.reconnect_max_ms));
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

enum End {
    Shutdown,
    Lost { consumed: bool },
}

struct Job {
    delivery: Delivery,
    decoded: Result<Notification, DecodeError>,
}

async fn session<B: Billing + 'static>(
    bus: &BusSettings,
    executor: &Arc<Executor<B>>,
    shutdown: &CancellationToken,
    health: &Health,
) -> Result<End, BusError> {
    let broker = broker_error(&bus.url);
    let connection = connect(&bus.url, "concertim-billing").await?;
    let setup = connection.create_channel().await.map_err(&broker)?;
    let names = topology::declare(&setup, bus).await?;
    let publisher = connection.create_channel().await.map_err(&broker)?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(&broker)?;
    let consuming = connection.create_channel().await.map_err(&broker)?;
    consuming.basic_qos(bus.prefetch, BasicQosOptions::default()).await.map_err(&broker)?;
    let mut consumer = consuming
        .basic_consume(
            names.queue.as_str().into(),
            CONSUMER_TAG.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(&broker)?;
    info!(queue = %names.queue, url = %bus.url, lanes = bus.lanes, "consuming");
    health.set_consuming(true);

    let settler = Settler::new(publisher, names, bus.max_attempts);
    let trouble = CancellationToken::new();
    let mut lanes = JoinSet::new();
    let mut senders = Vec::with_capacity(bus.lanes);
    for _ in 0..bus.lanes {
        let (tx, rx) = mpsc::channel(usize::from(bus.prefetch));
        senders.push(tx);
        lanes.spawn(lane(rx, Arc::clone(executor), settler.clone(), bus.backoff.clone(), trouble.clone()));
    }

    let mut consumed = false;
    let end = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // Stop new deliveries; what was already delivered is finished below.
                let _ = consuming.basic_cancel(CONSUMER_TAG.into(), BasicCancelOptions::default()).await;
                break End::Shutdown;
            }
            () = trouble.cancelled() => break End::Lost { consumed },
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    consumed = true;
                    metrics::gauge!(telemetry::IN_FLIGHT).increment(1.0);
                    let decoded = executor.decode(&delivery.data);
                    let lane = lane_of(&decoded, &delivery, senders.len());
                    // A busy lane must not hold up shutdown or reconnection: a job dropped here
                    // is unacknowledged, so the broker delivers it again.
                    tokio::select! {
                        sent = senders[lane].send(Job { delivery, decoded }) => {
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
        info!("stopped consuming");
    }
    Ok(end)
}

/// One project's messages always map to the same lane; messages without a project spread out.
fn lane_of(decoded: &Result<Notification, DecodeError>, delivery: &Delivery, lanes: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    match decoded.as_ref().ok().and_then(|n| n.event.project()) {
        Some(project) => project.hash(&mut hasher),
        None => delivery.delivery_tag.hash(&mut hasher),
    }
    (hasher.finish() % lanes as u64) as usize
}

async fn lane<B: Billing + 'static>(
    mut jobs: mpsc::Receiver<Job>,
    executor: Arc<Executor<B>>,
    settler: Settler,
    backoff: BackoffSettings,
    trouble: CancellationToken,
) {
    while let Some(Job { delivery, decoded }) = jobs.recv().await {
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
        if let Ok(n) = &decoded {
            if let Some(project) = n.event.project() {
                span.record("project_id", project.as_str());
            }
            if let Some(instance) = n.event.instance() {
                span.record("instance_id", instance.as_str());
            }
        }
        handle_job(&executor, &settler, &backoff, &trouble, delivery, decoded).instrument(span).await;
    }
}

/// Processes one message and settles it: the one place a lane acts on the broker.
async fn handle_job<B: Billing + 'static>(
    executor: &Arc<Executor<B>>,
    settler: &Settler,
    backoff: &BackoffSettings,
    trouble: &CancellationToken,
    delivery: Delivery,
    decoded: Result<Notification, DecodeError>,
) {
    let redelivered = delivery.redelivered || ack::attempts(&delivery) > 0;
    let source = decoded.as_ref().map_or("invalid", |n| telemetry::source(&n.event));
    let timestamp = decoded.as_ref().ok().map(|n| n.meta.timestamp);
    let (verdict, outcome) = process(executor, decoded, redelivered, backoff).await;
    metrics::counter!(telemetry::MESSAGES, "outcome" => outcome, "source" => source).increment(1);
    if let (Some(at), "processed") = (timestamp, outcome) {
        let lag = time::OffsetDateTime::now_utc() - at.as_offset();
        metrics::histogram!(telemetry::LAG).record(lag.as_seconds_f64().max(0.0));
    }
    let reason = match &verdict {
        Verdict::Ack => None,
        Verdict::Retry { reason } | Verdict::DeadLetter { reason, .. } => Some(reason.clone()),
    };
    let settled = settler.settle(delivery, verdict).await;
    metrics::gauge!(telemetry::IN_FLIGHT).decrement(1.0);
    match settled {
        Ok(Settled::Acked) => info!(outcome, "done"),
        Ok(Settled::Retried(attempt)) => {
            metrics::counter!(telemetry::RETRIED).increment(1);
            warn!(attempt, reason = reason.unwrap_or_default(), "retrying later");
        }
        Ok(Settled::DeadLettered(attempt)) => {
            metrics::counter!(telemetry::DEAD_LETTERED, "class" => outcome).increment(1);
            warn!(attempt, class = outcome, reason = reason.unwrap_or_default(), "dead-lettered");
        }
        Err(e) => {
            // Left unacknowledged: the broker redelivers it on the next connection.
            warn!(error.message = %e, "cannot settle; reconnecting");
            trouble.cancel();
        }
    }
}

/// Runs a message to its verdict, retrying transient failures in process; also returns the
/// outcome's metric label.
async fn process<B: Billing + 'static>(
    executor: &Arc<Executor<B>>,
    decoded: Result<Notification, DecodeError>,
    redelivered: bool,
    backoff: &BackoffSettings,
) -> (Verdict, &'static str) {
    let notification = match decoded {
        Ok(n) => Arc::new(n),
        Err(e) => return (Verdict::DeadLetter { class: ErrorClass::Invalid, reason: chain(&e) }, "invalid"),
    };
    let mut schedule = retry::in_process(backoff);
    let mut attempt = 0;
    loop {
        let task_executor = Arc::clone(executor);
        let task_notification = Arc::clone(&notification);
        let again = redelivered || attempt > 0;
        // Its own task, so that a panic loses this message only, not the lane.
        let handled = tokio::spawn(async move {
            let outcome = task_executor.execute(&task_notification, again).await;
            if let Outcome::Processed { .. } = outcome {
                task_executor.commit().await?;
            }
            Ok::<_, crate::billing::BillingError>(outcome)
        })
        .await;
        attempt += 1;
        let reason = match handled {
            Err(join) => {
                let verdict = Verdict::DeadLetter { class: ErrorClass::Permanent, reason: panic_reason(join) };
                return (verdict, "permanent");
            }
            Ok(Err(commit)) => chain(&commit),
            Ok(Ok(outcome)) => match outcome {
                Outcome::Processed { .. } => return (Verdict::Ack, "processed"),
                Outcome::Ignored { .. } => return (Verdict::Ack, "ignored"),
                Outcome::Invalid(e) => {
                    return (Verdict::DeadLetter { class: ErrorClass::Invalid, reason: chain(&e) }, "invalid")
                }
                Outcome::Failed { event_type, action, error } => {
                    let reason = format!("{event_type}: {action}: {}", chain(&error));
                    if error.class() != ErrorClass::Transient {
                        return (Verdict::DeadLetter { class: error.class(), reason }, error.class().as_str());
                    }
                    reason
                }
            },
        };
        match schedule.next_wait() {
            Some(wait) => tokio::time::sleep(wait).await,
            None => return (Verdict::Retry { reason }, "transient"),
        }
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

    fn delivery(tag: u64, body: &[u8]) -> Delivery {
        Delivery::mock(tag, "nova".into(), "notifications.info".into(), false, body.to_vec())
    }

    #[test]
    fn one_projects_messages_always_take_the_same_lane() {
        let executor = Executor::new(Settings::embedded(), Ledger::in_memory());
        let body = |id: &str| {
            format!(
                r#"{{"message_id":"{id}","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{{"resource_info":"p1"}}}}"#
            )
        };
        let lanes: Vec<usize> = (0..20u64)
            .map(|tag| {
                let b = body(&format!("m{tag}"));
                lane_of(&executor.decode(b.as_bytes()), &delivery(tag, b.as_bytes()), 8)
            })
            .collect();
        assert!(lanes.iter().all(|l| *l == lanes[0]), "{lanes:?}");
        // Messages without a project spread over the lanes.
        let spread: std::collections::BTreeSet<usize> =
            (0..64u64).map(|tag| lane_of(&executor.decode(b"x"), &delivery(tag, b"x"), 8)).collect();
        assert!(spread.len() > 1);
    }
}
