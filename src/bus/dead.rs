//! The dead-letter queue as the operator tools read it (`dlq`): letters fetched one at a time
//! without acknowledgement, so that closing the reader puts every one back in its place;
//! republished (confirmed, mandatory) and acknowledged only when a command acts on them.

use lapin::{
    message::BasicGetMessage,
    options::{BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use super::{ack, broker_error, connect, publish::properties_json, BusError, Names};
use crate::config::{BusSettings, SecretUrl};

/// The dead-letter queue, open for reading.
pub struct DeadLetters {
    _connection: lapin::Connection,
    channel: lapin::Channel,
    names: Names,
    url: SecretUrl,
}

/// One letter fetched and not acknowledged.
pub struct Fetched(BasicGetMessage);

impl Fetched {
    /// The body, as the broker holds it.
    pub fn body(&self) -> &[u8] {
        &self.0.delivery.data
    }

    /// One of its text headers.
    pub fn header(&self, name: &str) -> Option<String> {
        ack::header_text(&self.0.delivery.properties, name)
    }

    /// The attempts this service recorded.
    pub fn attempts(&self) -> u32 {
        ack::recorded_attempts(&self.0.delivery.properties)
    }

    /// Where the broker's own dead-lettering (`x-death`) says it was first published: exchange
    /// and routing key.
    pub fn first_death(&self) -> Option<(String, String)> {
        let AMQPValue::FieldArray(deaths) = ack::header(&self.0.delivery.properties, "x-death")? else {
            return None;
        };
        let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else { return None };
        let text = |v: &AMQPValue| match v {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        };
        let exchange = first.inner().get("exchange").and_then(text).unwrap_or_default();
        let key = match first.inner().get("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(text).unwrap_or_default(),
            _ => String::new(),
        };
        Some((exchange, key))
    }

    /// Its properties as the JSON a fixture line carries.
    pub fn properties_json(&self) -> String {
        properties_json(&self.0.delivery.properties)
    }
}

impl DeadLetters {
    /// Opens the dead-letter queue of `bus`.
    ///
    /// # Errors
    /// [`BusError::Missing`] when it does not exist (a wrong `bus.prefix`); when the broker
    /// cannot be reached.
    pub async fn open(bus: &BusSettings) -> Result<Self, BusError> {
        let connection = connect(bus, "concertim-billing dlq").await?;
        let names = Names::new(bus);
        // A passive declare of a missing queue closes its channel: check on a channel of its own.
        let probe = connection.create_channel().await.map_err(broker_error(&bus.url))?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        if probe.queue_declare(names.dead_queue.as_str().into(), passive, FieldTable::default()).await.is_err() {
            return Err(BusError::Missing {
                what: format!("the dead-letter queue {} on {}", names.dead_queue, bus.url),
                hint: "is bus.prefix right? `concertim-billing run` or `topology declare` creates it".into(),
            });
        }
        let _ = probe.close(200, "checked".into()).await;
        let channel = connection.create_channel().await.map_err(broker_error(&bus.url))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker_error(&bus.url))?;
        Ok(Self { _connection: connection, channel, names, url: bus.url.clone() })
    }

    /// Our main queue (where a requeue sends a letter by default).
    pub fn main_queue(&self) -> &str {
        &self.names.queue
    }

    /// The next letter, or `None` when every one was fetched.
    ///
    /// # Errors
    /// When the channel fails.
    pub async fn next(&self) -> Result<Option<Fetched>, BusError> {
        let got =
            self.channel.basic_get(self.names.dead_queue.as_str().into(), BasicGetOptions { no_ack: false }).await;
        Ok(got.map_err(broker_error(&self.url))?.map(Fetched))
    }

    /// Publishes the letter's body with its properties to `exchange`/`routing_key`, minus this
    /// service's failure headers (a requeued message starts its attempts afresh; its original
    /// route is kept). Mandatory: a route no queue takes leaves the letter where it is.
    ///
    /// # Errors
    /// [`BusError::NotConfirmed`] when no queue takes it; when the channel fails.
    pub async fn republish(&self, letter: &Fetched, exchange: &str, routing_key: &str) -> Result<(), BusError> {
        let properties = &letter.0.delivery.properties;
        let mut headers = FieldTable::default();
        if let Some(existing) = properties.headers() {
            for (k, v) in existing.inner() {
                let drop = [ack::REASON, ack::CLASS, ack::ATTEMPTS, ack::LAST_FAILURE, "x-death"].contains(&k.as_str());
                if !drop {
                    headers.insert(k.clone(), v.clone());
                }
            }
        }
        let properties = properties.clone().with_headers(headers);
        super::publish_confirmed(&self.channel, exchange, routing_key, letter.body(), properties, true).await
    }

    /// Removes the letter from the queue (after it was requeued, or to purge it).
    ///
    /// # Errors
    /// When the channel fails; the letter then stays.
    pub async fn remove(&self, letter: Fetched) -> Result<(), BusError> {
        ack::ack(letter.0.delivery).await
    }

    /// Returns every letter fetched and not removed to the queue, in place.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}
