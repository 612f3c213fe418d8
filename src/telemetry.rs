//! Telemetry: the metric names and labels (closed sets only: never ids or error text), the
//! Prometheus recorder, and the health state `/readyz` reads.
//!
//! Names follow `concertim_billing_<noun>[_<unit>]_total` for counters.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::event::{Event, ResourceKind};

/// Messages by outcome (`processed`, `ignored`, `invalid`, `transient`, `permanent`) and source.
pub const MESSAGES: &str = "concertim_billing_messages_total";
/// Messages republished to the retry queue.
pub const RETRIED: &str = "concertim_billing_retried_total";
/// Messages dead-lettered, by class.
pub const DEAD_LETTERED: &str = "concertim_billing_dead_lettered_total";
/// Seconds from the notification's timestamp to its effects being done.
pub const LAG: &str = "concertim_billing_bus_to_effect_seconds";
/// Messages taken from the broker and not yet settled.
pub const IN_FLIGHT: &str = "concertim_billing_in_flight";
/// Deliveries settled (their effect done) whose acknowledgement is not yet sent: it goes out
/// with the next batch (see `bus.ack_batch`).
pub const ACKS_PENDING: &str = "concertim_billing_acks_pending";
/// Concertim updates by kind (`device_status`, `refresh_team`, `device_cost`, `rack_cost`, …)
/// and result (`changed`, `unchanged`, `not_found`, `stale`, `scheduled`, `failed`).
pub const CONCERTIM_UPDATES: &str = "concertim_billing_concertim_updates_total";
/// Sharded mode: messages the intake moved from the main queue to the shards.
pub const INTAKE_MOVED: &str = "concertim_billing_intake_moved_total";
/// Sharded mode: 1 while this replica is the intake, 0 while it stands by.
pub const INTAKE_ACTIVE: &str = "concertim_billing_intake_active";
/// 1 while consuming, 0 while the broker is away.
pub const CONNECTED: &str = "concertim_billing_broker_connected";

/// HTTP connections closed on accept because the listener served its most at once (64).
pub const HTTP_REFUSED: &str = "concertim_billing_http_connections_refused_total";

/// 1 while a client runs with certificate verification turned off (`concertim.tls_verify`).
pub const TLS_UNVERIFIED: &str = "concertim_billing_tls_unverified";

/// Teams left linked to another billing account than their project's (never overwritten).
/// 1 for the broker node of a cluster the service last connected to, 0 for the others.
pub const BROKER_NODE: &str = "concertim_billing_broker_node";
/// Billing API requests, by route and status.
pub const API_REQUESTS: &str = "concertim_billing_api_requests_total";
/// Teams whose billing account differs from their project's.
pub const TEAM_ACCOUNT_CONFLICTS: &str = "concertim_billing_team_account_conflicts_total";

/// The source of an event, as a bounded label.
pub fn source(event: &Event) -> &'static str {
    match event {
        Event::ProjectCreated { .. }
        | Event::ProjectUpdated { .. }
        | Event::ProjectDeleted { .. }
        | Event::Identity(_) => "keystone",
        Event::Instance { .. } => "nova",
        Event::Usage { .. } => "ceilometer",
        Event::Stack(_) => "heat",
        Event::Resource(r) => match r.kind {
            ResourceKind::Volume | ResourceKind::Snapshot => "cinder",
            ResourceKind::FloatingIp | ResourceKind::NetworkInterface => "neutron",
            ResourceKind::Image => "glance",
            ResourceKind::Instance => "nova",
        },
        Event::Ignored { .. } => "other",
    }
}

/// The bucket bounds of the bus-to-effect histogram, in seconds.
pub const LAG_BUCKETS: [f64; 13] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];

/// Installs the process-wide Prometheus recorder and returns the handle `/metrics` renders.
/// A second call (tests run several services in one process) returns `None`.
pub fn install_prometheus() -> Option<PrometheusHandle> {
    let recorder = PrometheusBuilder::new().set_buckets(&LAG_BUCKETS).ok()?.build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    // Histogram samples pile up in the recorder until upkeep folds them in; rendering does it
    // too, but an unscraped process would grow without bound. A thread of its own, since this
    // runs once per process and must not depend on a runtime.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        })
        .ok()?;
    Some(handle)
}

/// How often the recorder's upkeep runs, scraped or not.
pub const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Sharded mode: 1 while the intake lock is held by a connection that moves nothing (the main
/// queue has messages and no consumer): alert on it.
pub const INTAKE_STUCK: &str = "concertim_billing_intake_stuck";

/// What `/healthz` and `/readyz` report.
#[derive(Debug, Default)]
pub struct Health {
    consuming: AtomicBool,
    sessions: AtomicUsize,
    intake_stuck: std::sync::Mutex<Option<(std::time::Instant, u32)>>,
}

impl Health {
    /// The consumer is consuming (or not).
    pub fn set_consuming(&self, consuming: bool) {
        if consuming {
            self.sessions.fetch_add(1, Ordering::Relaxed);
        }
        self.consuming.store(consuming, Ordering::Relaxed);
        metrics::gauge!(CONNECTED).set(if consuming { 1.0 } else { 0.0 });
    }

    /// Whether the consumer is consuming from the broker now.
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Relaxed)
    }

    /// Sharded mode: the intake lock is held elsewhere while the main queue has `waiting`
    /// messages and no consumer, since `since` (or `None`: nothing stuck).
    pub fn set_intake_stuck(&self, stuck: Option<(std::time::Instant, u32)>) {
        metrics::gauge!(INTAKE_STUCK).set(if stuck.is_some() { 1.0 } else { 0.0 });
        *self.intake_stuck.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = stuck;
    }

    /// For how long the intake has been stuck, and how many messages wait, if it is.
    pub fn intake_stuck(&self) -> Option<(std::time::Duration, u32)> {
        let stuck = *self.intake_stuck.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        stuck.map(|(since, waiting)| (since.elapsed(), waiting))
    }

    /// How many broker sessions have started (reconnections + 1).
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// How the text log writes each field: `name=value` with the value's control characters, line
/// separators and bidirectional overrides escaped, so a notification's `event_type` (or any
/// text it carries into an error) cannot end the line and forge the next one.
pub fn text_log_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static {
    use tracing_subscriber::field::MakeExt as _;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let text = format!("{value:?}");
        let text = crate::redact::printable(&text);
        if field.name() == "message" {
            write!(writer, "{text}")
        } else {
            write!(writer, "{}={text}", field.name())
        }
    })
    .delimited(" ")
}

#[cfg(test)]
mod log_tests {
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_field_cannot_forge_a_log_line() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(super::text_log_fields())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let event_type = "evil.type.0\u{2028}\nFORGED level=INFO {x=\"1\"}\u{1b}[2J";
            let span = tracing::info_span!("message", event_type = %event_type);
            let _entered = span.enter();
            tracing::info!(reason = %"a\r\nFORGED too", "done");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\u{2028}') && !text.contains('\r'), "{text}");
        assert!(text.contains("done") && text.contains("evil.type.0"), "{text}");
    }
}
