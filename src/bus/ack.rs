//! The one place a message's fate is carried out on the broker: acknowledge, republish to the
//! retry queue, or republish to the dead-letter queue.
//!
//! A republished message keeps its body and properties byte for byte and gains headers: the
//! reason, the class, the attempt count, the first and last failure times, and the original
//! exchange and routing key (so an operator can send it back where it came from). The original
//! is acknowledged only after the broker confirmed the republish: nothing is lost in between.
//! A consumer's acknowledgements go out in batches (see [`super::batch`]); the intake and `dlq`
//! acknowledge one by one ([`ack`]).
//! Failures are never nacked with requeue, so nothing loops.

use lapin::{
    message::Delivery,
    options::BasicAckOptions,
    types::{AMQPValue, FieldTable, LongString},
    BasicProperties, Channel,
};
use time::OffsetDateTime;

use super::{batch::AckSender, BusError, Names};
use crate::{class::ErrorClass, event::Timestamp};

/// Header: why the message failed.
pub const REASON: &str = "x-concertim-reason";
/// Header: the failure class (`invalid`, `transient`, `permanent`).
pub const CLASS: &str = "x-concertim-class";
/// Header: processing attempts so far.
pub const ATTEMPTS: &str = "x-concertim-attempts";
/// Header: when the first attempt failed (RFC 3339).
pub const FIRST_FAILURE: &str = "x-concertim-first-failure";
/// Header: when the last attempt failed (RFC 3339).
pub const LAST_FAILURE: &str = "x-concertim-last-failure";
/// Header: the exchange the message was first published to.
pub const ORIGINAL_EXCHANGE: &str = "x-concertim-original-exchange";
/// Header: the routing key the message was first published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-concertim-original-routing-key";

/// What should happen to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Done (processed or ignored): acknowledge.
    Ack,
    /// A transient failure after the in-process retries: try again later, or dead-letter as
    /// exhausted when the attempts are used up.
    Retry {
        /// The last error, with its causes.
        reason: String,
    },
    /// Can never succeed: dead-letter now.
    DeadLetter {
        /// Invalid or permanent.
        class: ErrorClass,
        /// The error, with its causes.
        reason: String,
    },
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acknowledged.
    Acked,
    /// Republished to the retry queue (this was attempt `n`), then acknowledged.
    Retried(u32),
    /// Republished to the dead-letter queue (after `n` attempts), then acknowledged.
    DeadLettered(u32),
}

/// Carries out verdicts. Its channel is in confirm mode.
#[derive(Debug, Clone)]
pub struct Settler {
    channel: Channel,
    names: Names,
    max_attempts: u32,
    /// Where follow-ups go (the Concertim queue), when there is such a queue.
    follow_ups: Option<String>,
    /// Where settled deliveries are acknowledged, in batches.
    acks: AckSender,
}

impl Settler {
    /// A settler publishing on `channel`, which must be in confirm mode, and acknowledging
    /// through `acks` (the acknowledger of the deliveries' channel).
    pub fn new(channel: Channel, names: Names, max_attempts: u32, acks: AckSender) -> Self {
        Self { channel, names, max_attempts, follow_ups: None, acks }
    }

    /// The same settler, publishing follow-ups to `queue`.
    #[must_use]
    pub fn with_follow_ups(mut self, queue: Option<String>) -> Self {
        self.follow_ups = queue;
        self
    }

    /// The queue this settler serves.
    pub fn queue(&self) -> &str {
        &self.names.queue
    }

    /// `"billing"` or `"concertim"`: which queue this settler serves, as a metric label.
    pub fn target(&self) -> &'static str {
        if self.names.queue.ends_with(".concertim") {
            "concertim"
        } else {
            "billing"
        }
    }

    /// Publishes a message's follow-up to the Concertim queue (through the default exchange)
    /// and waits for the broker's confirm.
    ///
    /// # Errors
    /// When the publish is not confirmed, or this settler has no queue for follow-ups.
    pub async fn forward(&self, follow_up: &super::consumer::FollowUp) -> Result<(), BusError> {
        let Some(queue) = &self.follow_ups else {
            return Err(BusError::Config { detail: format!("{} has no queue for follow-ups", self.names.queue) });
        };
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(follow_up.message_id.as_str().into());
        self.publish("", queue, &follow_up.body, properties).await
    }

    /// Carries out `verdict` for `delivery`, consuming it so it cannot be settled twice, and
    /// hands it to the acknowledger (its ack goes out with the next batch).
    ///
    /// # Errors
    /// When the republish is not confirmed; the message then stays unacknowledged and the
    /// broker redelivers it after a reconnect.
    pub async fn settle(&self, delivery: Delivery, verdict: Verdict) -> Result<Settled, BusError> {
        let settled = match verdict {
            Verdict::Ack => Settled::Acked,
            Verdict::Retry { reason } => {
                let attempt = attempts(&delivery, &self.names.queue) + 1;
                if attempt >= self.max_attempts {
                    let reason = format!("exhausted after {attempt} attempts: {reason}");
                    self.republish(&delivery, &self.names.dead_exchange, ErrorClass::Transient, &reason, attempt)
                        .await?;
                    Settled::DeadLettered(attempt)
                } else {
                    self.republish(&delivery, &self.names.retry_exchange, ErrorClass::Transient, &reason, attempt)
                        .await?;
                    Settled::Retried(attempt)
                }
            }
            Verdict::DeadLetter { class, reason } => {
                let attempt = attempts(&delivery, &self.names.queue) + 1;
                self.republish(&delivery, &self.names.dead_exchange, class, &reason, attempt).await?;
                Settled::DeadLettered(attempt)
            }
        };
        self.acks.settled(delivery);
        Ok(settled)
    }

    async fn republish(
        &self,
        delivery: &Delivery,
        exchange: &str,
        class: ErrorClass,
        reason: &str,
        attempt: u32,
    ) -> Result<(), BusError> {
        let properties = with_failure_headers(delivery, &self.names.queue, class, reason, attempt, now());
        self.publish(exchange, delivery.routing_key.as_str(), &delivery.data, properties).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BusError> {
        // Our own exchanges, always bound: not mandatory. A missing confirm leaves the message
        // unacknowledged, so redelivered.
        super::publish_confirmed(&self.channel, exchange, routing_key, body, properties, false).await
    }
}

/// Acknowledges a delivery, consuming it so it cannot be acknowledged twice: the one ack of the
/// service (settlement, the intake once a move is confirmed, `dlq` once a letter is requeued or
/// purged).
///
/// # Errors
/// When the channel is gone; the broker then delivers the message again.
pub async fn ack(delivery: Delivery) -> Result<(), BusError> {
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .map(drop)
        .map_err(|source| BusError::Broker { url: "(ack)".into(), source })
}

fn now() -> String {
    Timestamp::from_unix(OffsetDateTime::now_utc().unix_timestamp()).map(|t| t.to_rfc3339()).unwrap_or_default()
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// Whether the delivery came through this service's own exchanges: the default exchange (by
/// which the retry queue hands messages back and billing hands work to Concertim) or one named
/// after `queue` (retry, shard). Only then are its `x-concertim-*` headers ours: an upstream
/// publisher's copies of them (a forged route, a forged attempt count) are ignored.
pub fn from_us(delivery: &Delivery, queue: &str) -> bool {
    let exchange = delivery.exchange.as_str();
    exchange.is_empty() || exchange.strip_prefix(queue).is_some_and(|rest| rest.starts_with('.'))
}

/// One of our headers, when the delivery came through our own exchanges.
fn our_header(delivery: &Delivery, queue: &str, name: &str) -> Option<String> {
    from_us(delivery, queue).then(|| header_text(&delivery.properties, name)).flatten()
}

/// The attempts recorded in the message's headers (0 when it never failed, or when it came
/// from upstream, whose headers are not ours).
pub fn attempts(delivery: &Delivery, queue: &str) -> u32 {
    if !from_us(delivery, queue) {
        return 0;
    }
    recorded_attempts(&delivery.properties)
}

/// The attempts a message's headers record, whoever wrote them: for the dead-letter queue's
/// messages, which only this service publishes there.
pub fn recorded_attempts(properties: &BasicProperties) -> u32 {
    header(properties, ATTEMPTS).and_then(integer).map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// A header's value.
pub fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

/// A header as text, when it is a string.
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    match header(properties, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    Some(match *value {
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n,
        _ => return None,
    })
}

/// The delivery's properties with the original exchange and routing key recorded, unless an
/// earlier hop recorded them: what a message moved between our own queues keeps, so that its
/// dead letter still says where it came from.
pub(crate) fn with_original_route(delivery: &Delivery, queue: &str) -> BasicProperties {
    let properties = &delivery.properties;
    if our_header(delivery, queue, ORIGINAL_EXCHANGE).is_some() {
        return properties.clone();
    }
    let mut headers: FieldTable = properties.headers().clone().unwrap_or_default();
    headers.insert(ORIGINAL_EXCHANGE.into(), text(delivery.exchange.as_str()));
    headers.insert(ORIGINAL_ROUTING_KEY.into(), text(delivery.routing_key.as_str()));
    properties.clone().with_headers(headers)
}

/// The delivery's properties plus the failure headers. The first failure time and the original
/// exchange and routing key are kept from an earlier failure, when there was one.
fn with_failure_headers(
    delivery: &Delivery,
    queue: &str,
    class: ErrorClass,
    reason: &str,
    attempt: u32,
    now: String,
) -> BasicProperties {
    let properties = &delivery.properties;
    let mut headers: FieldTable = properties.headers().clone().unwrap_or_default();
    let first = our_header(delivery, queue, FIRST_FAILURE).unwrap_or_else(|| now.clone());
    let exchange =
        our_header(delivery, queue, ORIGINAL_EXCHANGE).unwrap_or_else(|| delivery.exchange.as_str().to_owned());
    let routing_key =
        our_header(delivery, queue, ORIGINAL_ROUTING_KEY).unwrap_or_else(|| delivery.routing_key.as_str().to_owned());
    // Headers are bounded like everything copied from a message: a reason can quote input.
    let reason: String = reason.chars().take(2000).collect();
    headers.insert(REASON.into(), text(&reason));
    headers.insert(CLASS.into(), text(class.as_str()));
    headers.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(attempt.into()));
    headers.insert(FIRST_FAILURE.into(), text(&first));
    headers.insert(LAST_FAILURE.into(), text(&now));
    headers.insert(ORIGINAL_EXCHANGE.into(), text(&exchange));
    headers.insert(ORIGINAL_ROUTING_KEY.into(), text(&routing_key));
    properties.clone().with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_message_records_its_first_route_and_keeps_it_on_later_hops() {
        let upstream = Delivery::mock(1, "nova".into(), "notifications.info".into(), false, b"{}".to_vec());
        let moved = with_original_route(&upstream, "billing");
        assert_eq!(header_text(&moved, ORIGINAL_EXCHANGE).as_deref(), Some("nova"));
        assert_eq!(header_text(&moved, ORIGINAL_ROUTING_KEY).as_deref(), Some("notifications.info"));

        let mut on_shard = Delivery::mock(2, "billing.shard".into(), "project-1".into(), false, b"{}".to_vec());
        on_shard.properties = moved;
        let failed = with_failure_headers(&on_shard, "billing", ErrorClass::Invalid, "bad", 1, "now".into());
        assert_eq!(header_text(&failed, ORIGINAL_EXCHANGE).as_deref(), Some("nova"));
        assert_eq!(
            header_text(&with_original_route(&on_shard, "billing"), ORIGINAL_ROUTING_KEY).as_deref(),
            Some("notifications.info")
        );
    }

    #[test]
    fn our_headers_forged_by_an_upstream_publisher_change_nothing() {
        let mut forged = Delivery::mock(1, "nova".into(), "notifications.info".into(), false, b"{}".to_vec());
        let mut headers = FieldTable::default();
        headers.insert(ORIGINAL_EXCHANGE.into(), text("amq.topic"));
        headers.insert(ORIGINAL_ROUTING_KEY.into(), text("somewhere.else"));
        headers.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(99));
        forged.properties = BasicProperties::default().with_headers(headers);
        // A forged attempt count skips no retry; a forged route is not where requeue sends it.
        assert_eq!(attempts(&forged, "billing"), 0);
        let failed = with_failure_headers(&forged, "billing", ErrorClass::Transient, "down", 1, "now".into());
        assert_eq!(header_text(&failed, ORIGINAL_EXCHANGE).as_deref(), Some("nova"));
        assert_eq!(header_text(&failed, ORIGINAL_ROUTING_KEY).as_deref(), Some("notifications.info"));
        assert_eq!(header_text(&with_original_route(&forged, "billing"), ORIGINAL_EXCHANGE).as_deref(), Some("nova"));
        // Back from our own retry queue (the default exchange), the headers are ours.
        let mut retried = Delivery::mock(2, "".into(), "billing".into(), false, b"{}".to_vec());
        retried.properties = failed;
        assert_eq!(attempts(&retried, "billing"), 1);
        assert!(!from_us(&Delivery::mock(3, "billingx.retry".into(), "".into(), false, vec![]), "billing"));
    }
}
