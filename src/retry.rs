//! Retry policy: every backoff schedule of the service is built here, on `backon`'s exponential
//! schedule (the `backoff` crate it replaced is unmaintained, RUSTSEC-2025-0012).

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

use crate::config::BackoffSettings;

/// A sequence of waits; `None` when it is time to give up.
#[derive(Debug)]
pub struct Schedule {
    builder: ExponentialBuilder,
    waits: ExponentialBackoff,
}

impl Schedule {
    fn new(builder: ExponentialBuilder) -> Self {
        Self { builder, waits: builder.build() }
    }

    /// The next wait, or `None` when the schedule is exhausted.
    pub fn next_wait(&mut self) -> Option<Duration> {
        self.waits.next()
    }

    /// Starts the schedule again (after a success).
    pub fn reset(&mut self) {
        self.waits = self.builder.build();
    }
}

/// In-process retries of a transient failure: exponential (×1.5) with jitter, until the waits
/// add up to `max_elapsed_ms`.
pub fn in_process(settings: &BackoffSettings) -> Schedule {
    Schedule::new(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(settings.initial_ms.max(1)))
            .with_max_delay(Duration::from_millis(settings.max_ms.max(1)))
            .with_factor(1.5)
            .with_jitter()
            .with_total_delay(Some(Duration::from_millis(settings.max_elapsed_ms)))
            .without_max_times(),
    )
}

/// Reconnection to the broker: exponential (×1.5) with jitter up to `max`, never giving up.
pub fn reconnect(max: Duration) -> Schedule {
    Schedule::new(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(max.max(Duration::from_millis(100)))
            .with_factor(1.5)
            .with_jitter()
            .without_max_times(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_process_retries_stop_when_disabled() {
        let mut s = in_process(&BackoffSettings { initial_ms: 10, max_ms: 10, max_elapsed_ms: 0 });
        assert_eq!(s.next_wait(), None);
    }

    #[test]
    fn in_process_retries_stop_once_their_waits_reach_the_bound_and_start_again_on_reset() {
        let settings = BackoffSettings { initial_ms: 10, max_ms: 40, max_elapsed_ms: 200 };
        let mut s = in_process(&settings);
        let waits: Vec<Duration> = std::iter::from_fn(|| s.next_wait()).take(100).collect();
        assert!(!waits.is_empty() && waits.len() < 100, "{waits:?}");
        assert!(waits.iter().sum::<Duration>() <= Duration::from_millis(200), "{waits:?}");
        s.reset();
        assert!(s.next_wait().is_some());
    }

    #[test]
    fn reconnection_never_gives_up_and_stays_under_its_maximum() {
        let mut s = reconnect(Duration::from_millis(500));
        for _ in 0..100 {
            // Jitter adds up to the delay itself.
            assert!(s.next_wait().unwrap() <= Duration::from_millis(1000));
        }
    }
}
