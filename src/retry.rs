//! Retry policy: every backoff schedule of the service is built here.
//!
//! The `backoff` crate is unmaintained (RUSTSEC-2025-0012); keeping its use to this module means
//! a swap (to `backon`, say) changes one file.

use std::time::Duration;

use backoff::{backoff::Backoff as _, ExponentialBackoff, ExponentialBackoffBuilder};

use crate::config::BackoffSettings;

/// A sequence of waits; `None` when it is time to give up.
#[derive(Debug)]
pub struct Schedule(ExponentialBackoff);

impl Schedule {
    /// The next wait, or `None` when the schedule is exhausted.
    pub fn next_wait(&mut self) -> Option<Duration> {
        self.0.next_backoff()
    }

    /// Starts the schedule again (after a success).
    pub fn reset(&mut self) {
        self.0.reset();
    }
}

/// In-process retries of a transient failure: exponential with jitter, bounded in total time.
pub fn in_process(settings: &BackoffSettings) -> Schedule {
    Schedule(
        ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(settings.initial_ms.max(1)))
            .with_max_interval(Duration::from_millis(settings.max_ms.max(1)))
            .with_max_elapsed_time(Some(Duration::from_millis(settings.max_elapsed_ms)))
            .build(),
    )
}

/// Reconnection to the broker: exponential with jitter up to `max`, never giving up.
pub fn reconnect(max: Duration) -> Schedule {
    Schedule(
        ExponentialBackoffBuilder::new()
            .with_initial_interval(Duration::from_millis(100))
            .with_max_interval(max.max(Duration::from_millis(100)))
            .with_max_elapsed_time(None)
            .build(),
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
    fn reconnection_never_gives_up_and_stays_under_its_maximum() {
        let mut s = reconnect(Duration::from_millis(500));
        for _ in 0..100 {
            // Jitter may add up to half the interval.
            assert!(s.next_wait().unwrap() <= Duration::from_millis(750));
        }
    }
}
