//! `capture`: taps the live bus into a fixture file.
//!
//! It reads a [`Tap`] (an exclusive queue bound like our main queue: a copy of every message,
//! stolen from no one). Credential fields are redacted unless asked otherwise.

use std::{io::Write, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    bus::{tap::Tap, BusError},
    config::BusSettings,
    fixture::to_line,
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
    let mut tap = Tap::open(bus).await?;
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
            next = tap.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
        };
        let mut fixture = delivery;
        if !raw {
            fixture.body = redact(&fixture.body).into_owned();
        }
        writeln!(out, "{}", to_line(&fixture))?;
        out.flush()?;
        written += 1;
        progress(written);
    }
    tap.close().await;
    Ok(written)
}
