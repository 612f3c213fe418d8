//! The two handlers the bus runs: [`BillingHandler`] (a notification through the executor)
//! and [`ConcertimHandler`] (a follow-up through the Concertim worker). Each turns a delivery
//! into a [`Processed`]: a verdict for `bus::ack` to carry out, its label, and the follow-up to
//! publish first. Transient failures are retried here, in process, before the bus's retry queue.

mod billing;
mod concertim;

use std::{future::Future, sync::Arc};

pub use billing::BillingHandler;
pub use concertim::ConcertimHandler;

use crate::{
    billing::Billing,
    bus::{ack::Verdict, FollowUp, Processed},
    class::{ErrorClass, Fate, Label},
    concertim::{ConcertimError, Worker},
    config::BackoffSettings,
    executor::Executor,
    retry,
};

/// The handlers of one service: billing, and Concertim when it is configured.
pub struct Handlers<B> {
    /// Bills the main queue (and picks each message's shard).
    pub billing: Arc<BillingHandler<B>>,
    /// Shows the follow-ups in Concertim.
    pub concertim: Option<Arc<ConcertimHandler<B>>>,
}

impl<B: Billing + 'static> Handlers<B> {
    /// The billing handler over `executor`, and the Concertim handler when its settings
    /// configure Concertim.
    ///
    /// # Errors
    /// When the Concertim worker cannot be made from its settings.
    pub fn new(executor: &Arc<Executor<B>>) -> Result<Self, ConcertimError> {
        let settings = executor.settings();
        let billing = Arc::new(BillingHandler::new(Arc::clone(executor), settings.bus.backoff.clone()));
        let concertim = match &settings.concertim {
            Some(c) => {
                let worker = Worker::new(c.clone(), executor.shared_billing())?;
                Some(Arc::new(ConcertimHandler::new(Arc::new(worker), c.backoff.clone())))
            }
            None => None,
        };
        Ok(Self { billing, concertim })
    }
}

/// Runs `attempt` (each run in its own task, so a panic loses only this message) until it is
/// done or failed for good, retrying failures worth retrying in process; then the verdict, with
/// the follow-up of the attempt that was done.
async fn with_retries<F, Fut>(backoff: &BackoffSettings, mut attempt: F) -> Processed
where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = (Fate, Option<FollowUp>)> + Send + 'static,
{
    let mut schedule = retry::in_process(backoff);
    let mut again = false;
    loop {
        let reason = match tokio::spawn(attempt(again)).await {
            Err(join) => return dead_letter(ErrorClass::Permanent, panic_reason(join)),
            Ok((Fate::Done(label), follow_up)) => return Processed { verdict: Verdict::Ack, label, follow_up },
            Ok((Fate::DeadLetter(class, reason), _)) => return dead_letter(class, reason),
            Ok((Fate::Retry(reason), _)) => reason,
        };
        again = true;
        match schedule.next_wait() {
            Some(wait) => tokio::time::sleep(wait).await,
            None => {
                let label = Label::Failed(ErrorClass::Transient);
                return Processed { verdict: Verdict::Retry { reason }, label, follow_up: None };
            }
        }
    }
}

/// The verdict of a fate that no retry in process can change.
fn without_retries(fate: Fate) -> Processed {
    match fate {
        Fate::Done(label) => Processed { verdict: Verdict::Ack, label, follow_up: None },
        Fate::DeadLetter(class, reason) => dead_letter(class, reason),
        Fate::Retry(reason) => Processed {
            verdict: Verdict::Retry { reason },
            label: Label::Failed(ErrorClass::Transient),
            follow_up: None,
        },
    }
}

/// A message dead-lettered with its class and reason.
fn dead_letter(class: ErrorClass, reason: String) -> Processed {
    Processed { verdict: Verdict::DeadLetter { class, reason }, label: Label::Failed(class), follow_up: None }
}

fn panic_reason(join: tokio::task::JoinError) -> String {
    if !join.is_panic() {
        return "the handler was cancelled".to_owned();
    }
    let payload = join.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    format!("the handler panicked: {message}")
}
