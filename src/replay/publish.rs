//! `replay --publish`: fixture files onto the broker, standing in for OpenStack's publishers.

use std::path::PathBuf;

use super::ReplayError;
use crate::{
    bus::{publish::Publisher, BusError},
    config::Settings,
    fixture,
};

/// How a publish went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Messages the broker confirmed.
    pub sent: usize,
    /// Messages not published (unreadable, without an exchange, or refused).
    pub failed: usize,
}

/// Publishes every fixture in `paths` to the exchange it names, declaring the upstream
/// exchanges first as OpenStack's publishers do; `on_problem` hears each message not published.
///
/// # Errors
/// [`ReplayError::Usage`] without paths; when the files cannot be listed or the broker cannot
/// be reached.
pub async fn publish(
    settings: &Settings,
    paths: &[PathBuf],
    mut on_problem: impl FnMut(String),
) -> Result<Published, ReplayError> {
    if paths.is_empty() {
        return Err(ReplayError::Usage("nothing to publish: give fixture PATHS".into()));
    }
    let files = fixture::collect_files(paths)?;
    let mut publisher = Publisher::connect(&settings.bus).await?;
    // Standing in for OpenStack's publishers, which declare their exchanges before publishing.
    let mut declared = std::collections::BTreeSet::new();
    for (_, delivery) in files.iter().flat_map(|f| fixture::read_all(std::slice::from_ref(f))) {
        if let Some(exchange) = delivery.ok().and_then(|d| d.exchange) {
            if declared.insert(exchange.clone()) {
                publisher.ensure_upstream(&exchange, settings.bus.upstream_durable).await?;
            }
        }
    }
    // A service started just before waits for those exchanges and then binds its queue: a
    // message with no queue bound yet is tried again for a while rather than lost.
    let patience = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut published = Published::default();
    for (position, delivery) in files.iter().flat_map(|f| fixture::read_all(std::slice::from_ref(f))) {
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(e) => {
                on_problem(format!("{position}: not published: {e}"));
                published.failed += 1;
                continue;
            }
        };
        let Some(exchange) = delivery.exchange.as_deref() else {
            on_problem(format!("{position}: skipped: the fixture names no exchange"));
            published.failed += 1;
            continue;
        };
        let mut result = publisher.publish(exchange, &delivery).await;
        while matches!(result, Err(BusError::NotConfirmed { .. })) && std::time::Instant::now() < patience {
            // Waiting for the service to bind its queue: nothing to await but the broker.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            result = publisher.publish(exchange, &delivery).await;
        }
        match result {
            Ok(()) => published.sent += 1,
            Err(e) => {
                on_problem(format!("{position}: not published: {e}"));
                published.failed += 1;
            }
        }
    }
    Ok(published)
}
