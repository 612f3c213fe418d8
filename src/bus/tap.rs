//! A tap on the live bus (`capture`): an exclusive, auto-deleted queue bound like our main
//! queue, so it takes a copy of every message and steals nothing from anyone: our main queue
//! and OpenStack's own queues still get theirs.

use futures_lite::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};

use super::{broker_error, connect, publish::properties_json, topology, BusError};
use crate::{
    config::{BusSettings, SecretUrl},
    fixture::FixtureDelivery,
};

/// The tap, in place.
pub struct Tap {
    connection: lapin::Connection,
    consumer: lapin::Consumer,
    url: SecretUrl,
}

impl Tap {
    /// Puts the tap in place on every configured binding whose upstream exchange exists (the
    /// others are named in a warning: the tap never creates them).
    ///
    /// # Errors
    /// When the broker cannot be reached or refuses the queue.
    pub async fn open(bus: &BusSettings) -> Result<Self, BusError> {
        let broker = broker_error(&bus.url);
        let connection = connect(bus, "concertim-billing capture").await?;
        let channel = connection.create_channel().await.map_err(&broker)?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let queue = channel.queue_declare("".into(), options, FieldTable::default()).await.map_err(&broker)?;
        for binding in &bus.bindings {
            // Checked, never created: see `topology::check_upstream`.
            if !topology::upstream_exists(bus, &binding.exchange).await? {
                tracing::warn!("{}; not captured", BusError::UpstreamAbsent { exchange: binding.exchange.clone() });
                continue;
            }
            channel
                .queue_bind(
                    queue.name().clone(),
                    binding.exchange.as_str().into(),
                    binding.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(&broker)?;
        }
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "concertim-billing-capture".into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await
            .map_err(&broker)?;
        Ok(Self { connection, consumer, url: bus.url.clone() })
    }

    /// The next message as a fixture delivery (body as received), or `None` when the broker
    /// ended the tap.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn next(&mut self) -> Option<Result<FixtureDelivery, BusError>> {
        let next = self.consumer.next().await?;
        Some(next.map_err(broker_error(&self.url)).map(|delivery| FixtureDelivery {
            exchange: Some(delivery.exchange.as_str().to_owned()),
            routing_key: Some(delivery.routing_key.as_str().to_owned()),
            properties: Some(properties_json(&delivery.properties)),
            redelivered: delivery.redelivered,
            body: delivery.data,
        }))
    }

    /// Removes the tap (its queue goes with the connection).
    pub async fn close(self) {
        let _ = self.connection.close(200, "capture done".into()).await;
    }
}
