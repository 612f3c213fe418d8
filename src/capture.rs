//! `capture`: taps the live bus into a fixture file.
//!
//! It declares its own exclusive, auto-deleted queue, bound like our main queue, so it takes a
//! copy of every message and steals nothing from anyone: our main queue and OpenStack's own
//! queues still get theirs. Credential fields are redacted unless asked otherwise.

use std::{io::Write, time::Duration};

use futures_lite::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{broker_error, connect, publish::properties_json, BusError},
    config::BusSettings,
    fixture::{to_line, FixtureDelivery},
    redact::redact,
};

/// When to stop.
#[derive(Debug, Clone, Copy, Default)]
pub struct Until {
    /// After this many messages.
    pub count: Option<usize>,
    /// After this long.
    pub duration: Option<Duration>,
}

/// Why capturing stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The broker failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The output could not be written.
    #[error("cannot write the capture: {0}")]
    Write(#[from] std::io::Error),
}

/// Writes every message reaching the configured bindings to `out`, one fixture line each, until
/// `until` or `stop`; `progress` hears the running count (first 0, once the tap is in place).
/// Returns how many were written.
///
/// # Errors
/// When the broker fails or the output cannot be written.
pub async fn capture(
    bus: &BusSettings,
    out: &mut impl Write,
    until: Until,
    raw: bool,
    stop: CancellationToken,
    mut progress: impl FnMut(usize),
) -> Result<usize, CaptureError> {
    let broker = broker_error(&bus.url);
    let connection = connect(&bus.url, "concertim-billing capture").await?;
    let channel = connection.create_channel().await.map_err(&broker)?;
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
    let queue = channel.queue_declare("".into(), options, FieldTable::default()).await.map_err(&broker)?;
    for binding in &bus.bindings {
        // Checked, never created: see `topology::check_upstream`.
        if !crate::bus::topology::upstream_exists(bus, &binding.exchange).await? {
            tracing::warn!(
                "{}; not captured",
                crate::bus::BusError::UpstreamAbsent { exchange: binding.exchange.clone() }
            );
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
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "concertim-billing-capture".into(),
            BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
            FieldTable::default(),
        )
        .await
        .map_err(&broker)?;
    let deadline = async {
        match until.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut written = 0;
    progress(0);
    while until.count.is_none_or(|c| written < c) {
        let delivery = tokio::select! {
            () = stop.cancelled() => break,
            () = &mut deadline => break,
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(broker(e).into()),
                None => break,
            },
        };
        let fixture = FixtureDelivery {
            exchange: Some(delivery.exchange.as_str().to_owned()),
            routing_key: Some(delivery.routing_key.as_str().to_owned()),
            properties: Some(properties_json(&delivery.properties)),
            redelivered: delivery.redelivered,
            body: if raw { delivery.data } else { redact(&delivery.data).into_owned() },
        };
        writeln!(out, "{}", to_line(&fixture))?;
        out.flush()?;
        written += 1;
        progress(written);
    }
    let _ = connection.close(200, "capture done".into()).await;
    Ok(written)
}
