//! Billing: a notification from our main queue (or a shard) through [`Executor::handle_decoded`].

use std::sync::Arc;

use super::with_retries;
use crate::{
    billing::Billing,
    bus::{FollowUp, Handler, Processed},
    class::Label,
    config::BackoffSettings,
    event::{Notification, Timestamp},
    executor::{Executor, InvalidMessage, Outcome},
    notification::DecodeError,
    telemetry,
};

/// Bills notifications: decode (to pick the lane), then the executor's single step.
pub struct BillingHandler<B> {
    executor: Arc<Executor<B>>,
    backoff: BackoffSettings,
}

impl<B> BillingHandler<B> {
    /// A handler over `executor`, retrying transient failures in process on `backoff`.
    pub fn new(executor: Arc<Executor<B>>, backoff: BackoffSettings) -> Self {
        Self { executor, backoff }
    }
}

/// A notification as decoded for its lane.
pub struct Decoded(Result<Arc<Notification>, DecodeError>);

impl<B: Billing + 'static> Handler for BillingHandler<B> {
    type Prepared = Decoded;

    fn prepare(&self, body: &[u8]) -> Decoded {
        Decoded(self.executor.decode(body).map(Arc::new))
    }

    fn lane_key(prepared: &Decoded) -> Option<&str> {
        prepared.0.as_ref().ok().and_then(|n| n.event.project()).map(|p| p.as_str())
    }

    fn span(prepared: &Decoded) -> tracing::Span {
        let decoded = &prepared.0;
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
        let source = prepared.0.as_ref().map_or("invalid", |n| telemetry::source(&n.event));
        let timestamp = prepared.0.as_ref().ok().map(|n| n.meta.timestamp);
        let processed = match prepared.0 {
            Err(e) => super::without_retries(Outcome::Invalid(InvalidMessage::Decode(e)).fate()),
            Ok(notification) => {
                with_retries(&self.backoff, |again| {
                    let executor = Arc::clone(&self.executor);
                    let notification = Arc::clone(&notification);
                    async move {
                        let outcome = executor.handle_decoded(&notification, redelivered || again).await;
                        let follow_up = outcome
                            .follow_up()
                            .map(|work| FollowUp { message_id: work.message_id.clone(), body: work.to_body() });
                        (outcome.fate(), follow_up)
                    }
                })
                .await
            }
        };
        let label = processed.label;
        metrics::counter!(telemetry::MESSAGES, "outcome" => label.as_str(), "source" => source).increment(1);
        if let (Some(at), Label::Processed) = (timestamp, label) {
            record_lag(at);
        }
        processed
    }
}

fn record_lag(at: Timestamp) {
    let lag = time::OffsetDateTime::now_utc() - at.as_offset();
    metrics::histogram!(telemetry::LAG).record(lag.as_seconds_f64().max(0.0));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{billing::Ledger, config::Settings};

    #[test]
    fn a_notifications_lane_key_is_its_project_and_an_invalid_one_has_none() {
        let executor = Arc::new(Executor::new(Settings::embedded(), Ledger::in_memory()));
        let handler = BillingHandler::new(executor, BackoffSettings::default());
        let created = br#"{"message_id":"m1","event_type":"identity.project.created","timestamp":"2025-01-01 00:00:00","payload":{"resource_info":"p1"}}"#;
        assert_eq!(BillingHandler::<Ledger>::lane_key(&handler.prepare(created)), Some("p1"));
        assert_eq!(BillingHandler::<Ledger>::lane_key(&handler.prepare(b"{")), None);
    }
}
