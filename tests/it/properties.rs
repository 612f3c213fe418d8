//! Properties of the whole pipeline: arrival order and duplication do not change what is
//! billed, and no input panics the decoder or the executor.

use concertim_billing::{
    billing::{ledger::Snapshot, Ledger},
    config::Settings,
    executor::{Delivery, Executor},
    fixture::FixtureDelivery,
    notification::{decode, DecodeLimits},
    settle::Horizon,
};
use proptest::prelude::*;

use crate::support::{billable, permutation_with_duplicates, resize_settings as settings};

/// What the ledger holds after the messages in `order`, settled as of 2025-03-10 (after the
/// last fixture): the instances that ended to their end, the running ones to that time.
fn replay_in(order: impl IntoIterator<Item = usize>, all: &[FixtureDelivery]) -> Snapshot {
    let executor = Executor::new(settings(), Ledger::in_memory());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        for i in order {
            let d = &all[i];
            executor.handle(Delivery { body: &d.body, redelivered: d.redelivered }).await;
        }
        let as_of = concertim_billing::event::Timestamp::parse("2025-03-10T00:00:00Z").unwrap();
        let pass = executor.settler().await.unwrap().pass(Horizon::AsOf(as_of.unix())).await.unwrap();
        assert!(pass.failures.is_empty(), "{:?}", pass.failures);
    });
    executor.billing().snapshot()
}

#[test]
fn the_in_order_replay_bills_the_resize_on_the_large_plan() {
    let all = billable();
    let snapshot = replay_in(0..all.len(), &all);
    let plans: Vec<&str> = snapshot.subscriptions.iter().map(|s| s.plan.as_str()).collect();
    assert_eq!(plans.iter().filter(|p| **p == "openstack-large-monthly").count(), 2, "{plans:?}");
}

#[test]
fn replaying_in_reverse_order_gives_the_same_ledger() {
    let all = billable();
    assert_eq!(replay_in((0..all.len()).rev(), &all), replay_in(0..all.len(), &all));
}

#[test]
fn replaying_every_message_twice_gives_the_same_ledger() {
    let all = billable();
    let twice = (0..all.len()).flat_map(|i| [i, i]);
    assert_eq!(replay_in(twice, &all), replay_in(0..all.len(), &all));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn any_order_with_any_duplicates_gives_the_same_ledger(order in permutation_with_duplicates(billable().len())) {
        let all = billable();
        prop_assert_eq!(replay_in(order, &all), replay_in(0..all.len(), &all));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes, DecodeLimits::default());
    }

    #[test]
    fn mutated_valid_messages_never_panic_the_pipeline(
        pick in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u8>()), 1..8),
        inner in any::<bool>(),
    ) {
        let all = billable();
        let body = &all[pick.index(all.len())].body;
        // Mutating the inner oslo.message text (then re-wrapping it) reaches the payload
        // decoders; mutating the outer body mostly exercises the envelope.
        let mut text: Vec<u8> = if inner { inner_message(body) } else { body.clone() };
        for (at, kind, byte) in edits {
            let i = at.index(text.len().max(1)).min(text.len());
            let token: &[u8] = match byte % 8 {
                0 => b"null", 1 => b"\"\"", 2 => b"[", 3 => b"}", 4 => b"\"None\"", 5 => b"1e999", 6 => b"-1", _ => b"{\"a\":",
            };
            match kind {
                0 if i < text.len() => text[i] = byte,
                1 => { text.splice(i..i, token.iter().copied()); }
                2 if i < text.len() => { text.remove(i); }
                _ => text.truncate(i),
            }
        }
        let bytes = if inner { rewrap(&text) } else { text };
        let _ = decode(&bytes, DecodeLimits::default());
        let executor = Executor::new(Settings::embedded(), Ledger::in_memory());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = runtime.block_on(executor.handle(Delivery { body: &bytes, redelivered: false }));
    }
}

fn inner_message(body: &[u8]) -> Vec<u8> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        #[serde(rename = "oslo.message")]
        message: String,
    }
    serde_json::from_slice::<Envelope>(body).map(|e| e.message.into_bytes()).unwrap_or_else(|_| body.to_vec())
}

fn rewrap(message: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(message);
    serde_json::to_vec(&serde_json::json!({"oslo.version": "2.0", "oslo.message": text})).unwrap()
}
