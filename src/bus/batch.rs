//! Batched acknowledgements: a consumer's settled deliveries are acknowledged a prefix at a
//! time, with one `basic.ack` whose `multiple` flag covers every delivery up to its tag.
//!
//! A channel numbers its deliveries 1, 2, 3… without gaps (every consumer of the channel
//! shares the count), so "every delivery up to tag N is settled" is known exactly: the prefix
//! runs from the first unacknowledged tag through the settled ones, and stops at the first
//! delivery still in flight in some lane. That delivery is never covered. A prefix is
//! acknowledged once it holds `bus.ack_batch` settled deliveries, or `bus.ack_delay_ms` after
//! a delivery was settled, or on shutdown; the last two also acknowledge, one by one, the
//! settled deliveries beyond a slow one, so a message that takes long holds no other back.
//!
//! Nothing is lost by waiting: a delivery is settled (its effect done, its republish to the
//! retry or dead-letter queue confirmed) before it is offered here, and if the process dies
//! before the ack, the broker delivers it again and its effect is idempotent.

use std::{collections::BTreeMap, time::Duration};

use lapin::{message::Delivery, options::BasicAckOptions, Acker};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::telemetry;

/// How long sending one acknowledgement may take.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a lane hands a settled delivery for its acknowledgement.
#[derive(Debug, Clone)]
pub struct AckSender {
    settled: mpsc::UnboundedSender<(u64, Acker)>,
}

impl AckSender {
    /// Hands over a settled delivery, consuming it so it cannot be acknowledged twice. When
    /// the session's acknowledger has stopped (the channel is gone) this does nothing: the
    /// broker then delivers the message again.
    pub fn settled(&self, delivery: Delivery) {
        let _ = self.settled.send((delivery.delivery_tag, delivery.acker));
    }
}

/// A session's acknowledger: a task that owns the pending acknowledgements of one channel.
#[derive(Debug)]
pub struct Acknowledger {
    task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Acknowledger {
    /// Starts the acknowledger of a fresh channel: acknowledges a prefix once it holds `batch`
    /// settled deliveries, or `delay` after one was settled. A failed acknowledgement cancels
    /// `trouble` (the session then reconnects, and the broker redelivers what was not
    /// acknowledged).
    pub fn start(batch: usize, delay: Duration, trouble: CancellationToken) -> (Self, AckSender) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(acknowledge(rx, batch.max(1), delay, trouble));
        (Self { task: tokio_util::task::AbortOnDropHandle::new(task) }, AckSender { settled: tx })
    }

    /// Waits until every settled delivery is acknowledged: once every [`AckSender`] is dropped
    /// (the lanes have finished), what is pending is flushed and the task ends.
    pub async fn finish(self) {
        let _ = self.task.await;
    }
}

async fn acknowledge(
    mut settled: mpsc::UnboundedReceiver<(u64, Acker)>,
    batch: usize,
    delay: Duration,
    trouble: CancellationToken,
) {
    let mut pending = Pending::default();
    let mut deadline: Option<Instant> = None;
    let gauge = metrics::gauge!(telemetry::ACKS_PENDING);
    loop {
        gauge.set(pending.waiting() as f64);
        let next = match deadline {
            Some(at) => tokio::select! {
                next = settled.recv() => next,
                () = tokio::time::sleep_until(at) => {
                    deadline = None;
                    if !send(pending.take(true), &trouble).await {
                        return;
                    }
                    continue;
                }
            },
            None => settled.recv().await,
        };
        let Some((tag, acker)) = next else {
            // Every lane is done: flush all, then stop.
            send(pending.take(true), &trouble).await;
            gauge.set(0.0);
            return;
        };
        pending.settled(tag, acker);
        while let Ok((tag, acker)) = settled.try_recv() {
            pending.settled(tag, acker);
        }
        if pending.waiting() >= batch && !send(pending.take(false), &trouble).await {
            return;
        }
        if pending.waiting() == 0 {
            deadline = None;
        } else if deadline.is_none() {
            deadline = Some(Instant::now() + delay);
        }
    }
}

/// Sends the acknowledgements in order (a `multiple` ack must never reach the broker after an
/// ack of a tag it covers). Returns whether all were sent; otherwise the channel is gone and
/// `trouble` is cancelled.
async fn send(acks: Vec<(Acker, bool, usize)>, trouble: &CancellationToken) -> bool {
    for (acker, multiple, _) in acks {
        // Bounded: on a connection the broker no longer answers, the frame may never be sent.
        let failure = match tokio::time::timeout(ACK_TIMEOUT, acker.ack(BasicAckOptions { multiple })).await {
            Ok(Ok(true)) => continue,
            Ok(Ok(false)) => "the channel is closed".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("not sent within {ACK_TIMEOUT:?}"),
        };
        warn!(error.message = %failure, "cannot acknowledge; reconnecting");
        trouble.cancel();
        return false;
    }
    true
}

/// The state of one channel's acknowledgements: every tag below `next` is acknowledged; above
/// it, each known tag is settled (waiting for its ack) or already acknowledged on its own.
#[derive(Debug)]
struct Pending<A> {
    next: u64,
    tags: BTreeMap<u64, Tag<A>>,
    waiting: usize,
}

#[derive(Debug)]
enum Tag<A> {
    Settled(A),
    Acked,
}

impl<A> Default for Pending<A> {
    fn default() -> Self {
        // A channel's first delivery tag is 1.
        Self { next: 1, tags: BTreeMap::new(), waiting: 0 }
    }
}

impl<A> Pending<A> {
    /// Records a settled delivery.
    fn settled(&mut self, tag: u64, acker: A) {
        if tag >= self.next && self.tags.insert(tag, Tag::Settled(acker)).is_none() {
            self.waiting += 1;
        }
    }

    /// Settled deliveries not yet acknowledged.
    fn waiting(&self) -> usize {
        self.waiting
    }

    /// The acknowledgements to send now, in order, each with its `multiple` flag and how many
    /// deliveries it covers: the settled prefix as one `multiple` ack; with `all`, also each
    /// settled delivery beyond it on its own.
    fn take(&mut self, all: bool) -> Vec<(A, bool, usize)> {
        let mut acks = Vec::new();
        let mut last: Option<A> = None;
        let mut covered = 0;
        while let Some(tag) = self.tags.remove(&self.next) {
            if let Tag::Settled(acker) = tag {
                last = Some(acker);
                covered += 1;
            }
            self.next += 1;
        }
        if let Some(acker) = last {
            acks.push((acker, true, covered));
        }
        if all {
            for tag in self.tags.values_mut() {
                if let Tag::Settled(acker) = std::mem::replace(tag, Tag::Acked) {
                    acks.push((acker, false, 1));
                }
            }
        }
        self.waiting -= acks.iter().map(|(_, _, covered)| covered).sum::<usize>();
        acks
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The acks as (tag, multiple, covered).
    fn take(pending: &mut Pending<u64>, all: bool) -> Vec<(u64, bool, usize)> {
        pending.take(all)
    }

    #[test]
    fn the_settled_prefix_is_acknowledged_with_one_multiple_ack_up_to_its_last_tag() {
        let mut pending = Pending::default();
        for tag in [2, 1, 3] {
            pending.settled(tag, tag);
        }
        assert_eq!(take(&mut pending, false), [(3, true, 3)]);
        assert_eq!(pending.waiting(), 0);
        assert!(take(&mut pending, true).is_empty());
    }

    #[test]
    fn a_delivery_still_in_flight_is_never_covered_by_a_multiple_ack() {
        let mut pending = Pending::default();
        // 3 is still being handled.
        for tag in [1, 2, 4, 5] {
            pending.settled(tag, tag);
        }
        assert_eq!(take(&mut pending, false), [(2, true, 2)]);
        assert_eq!(pending.waiting(), 2);
        // After the delay, 4 and 5 are acknowledged on their own, still never 3.
        assert_eq!(take(&mut pending, true), [(4, false, 1), (5, false, 1)]);
        assert_eq!(pending.waiting(), 0);
        // When 3 is settled, the prefix runs through 5, but only 3 needs an ack: an ack of 5
        // again would be an unknown tag to the broker, which closes the channel.
        pending.settled(3, 3);
        pending.settled(6, 6);
        assert_eq!(take(&mut pending, false), [(6, true, 2)]);
        assert_eq!(pending.next, 7);
    }

    #[test]
    fn a_tag_already_acknowledged_is_not_taken_again() {
        let mut pending = Pending::default();
        pending.settled(1, 1);
        assert_eq!(take(&mut pending, false), [(1, true, 1)]);
        pending.settled(1, 1);
        assert_eq!(pending.waiting(), 0);
        assert!(take(&mut pending, true).is_empty());
    }

    #[test]
    fn nothing_is_acknowledged_while_the_first_delivery_is_in_flight_until_all_is_asked() {
        let mut pending = Pending::default();
        pending.settled(2, 2);
        assert!(take(&mut pending, false).is_empty());
        assert_eq!(take(&mut pending, true), [(2, false, 1)]);
    }

    proptest! {
        /// Whatever order deliveries settle in and whenever flushes happen, every settled tag is
        /// acknowledged exactly once (by its own ack or a later multiple one), and no ack
        /// covers a tag not yet settled.
        #[test]
        fn every_settled_delivery_is_acknowledged_once_and_nothing_unsettled_ever(
            order in proptest::sample::subsequence((1u64..=40).collect::<Vec<_>>(), 0..=40)
                .prop_shuffle(),
            flushes in proptest::collection::vec(any::<(bool, bool)>(), 40),
        ) {
            let mut pending = Pending::default();
            let mut settled = std::collections::BTreeSet::new();
            let mut acked = std::collections::BTreeSet::new();
            let mut apply = |acks: Vec<(u64, bool, usize)>, settled: &std::collections::BTreeSet<u64>| {
                for (tag, multiple, _) in acks {
                    let covers: Vec<u64> = if multiple {
                        (1..=tag).filter(|t| !acked.contains(t)).collect()
                    } else {
                        vec![tag]
                    };
                    prop_assert!(!acked.contains(&tag), "tag {} acknowledged twice", tag);
                    for t in covers {
                        prop_assert!(settled.contains(&t), "tag {} acknowledged before it was settled", t);
                        acked.insert(t);
                    }
                }
                Ok(())
            };
            for (tag, (flush, all)) in order.iter().zip(flushes) {
                pending.settled(*tag, *tag);
                settled.insert(*tag);
                if flush {
                    apply(pending.take(all), &settled)?;
                }
            }
            apply(pending.take(true), &settled)?;
            prop_assert_eq!(&acked, &settled);
            prop_assert_eq!(pending.waiting(), 0);
        }
    }
}
