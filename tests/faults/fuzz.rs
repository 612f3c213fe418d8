//! A long fuzz run of the decoder and the executor behind it: random JSON in every layer,
//! real fixtures and upstream samples with a node replaced, spliced or truncated, and random
//! bytes. `CONCERTIM_BILLING_FUZZ_CASES` sets the number of cases of each property (default
//! 2,000, which CI runs; `RELIABILITY.md` gives the long run's command).

use concertim_billing::{
    billing::Ledger,
    config::Settings,
    executor::{Delivery, Executor},
    notification::{decode, DecodeLimits},
};
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::support::{deliveries, upstream_corpus};

fn cases() -> u32 {
    std::env::var("CONCERTIM_BILLING_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

/// The inner oslo messages of the fixtures (malformed ones included) and of the upstream
/// samples beside the project.
fn corpus() -> &'static [Value] {
    static CORPUS: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut out: Vec<Value> = deliveries("").iter().filter_map(|d| message_of(&d.body)).collect();
        if let Some(dir) = upstream_corpus() {
            let mut stack = vec![dir];
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = entry.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if path.extension().is_some_and(|e| e == "json") {
                        if let Some(m) = std::fs::read(&path).ok().and_then(|b| message_of(&b)) {
                            out.push(m);
                        }
                    }
                }
            }
        }
        out
    })
}

fn message_of(body: &[u8]) -> Option<Value> {
    let outer: Value = serde_json::from_slice(body).ok()?;
    match outer.get("oslo.message").and_then(Value::as_str) {
        Some(text) => serde_json::from_str(text).ok(),
        None => Some(outer),
    }
}

/// Strings that mean something to some decoder: ids, timestamps, "None", numbers as text.
fn telling_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("None".to_owned()),
        Just("null".to_owned()),
        Just("2025-03-03T09:00:41.000000".to_owned()),
        Just("2025-03-03 09:00:41+00:00".to_owned()),
        Just("e89cb74df0069d478e26645ca53ab73f".to_owned()),
        Just("2dc673b9-8b8f-dcab-44c5-c769c9d8677c".to_owned()),
        Just("1e999".to_owned()),
        Just("-0.0".to_owned()),
        Just("compute.instance.create.end".to_owned()),
        Just("metering".to_owned()),
        "\\PC{0,24}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        telling_string().prop_map(Value::String),
    ]
}

/// Any JSON value, nested a few levels, with keys billing reads.
fn any_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("payload".to_owned()),
        Just("event_type".to_owned()),
        Just("message_id".to_owned()),
        Just("timestamp".to_owned()),
        Just("tenant_id".to_owned()),
        Just("instance_id".to_owned()),
        Just("launched_at".to_owned()),
        Just("deleted_at".to_owned()),
        Just("counter_name".to_owned()),
        Just("counter_volume".to_owned()),
        Just("resource_id".to_owned()),
        Just("project_id".to_owned()),
        Just("samples".to_owned()),
        Just("nova_object.data".to_owned()),
        "[a-z_.]{0,12}",
    ];
    leaf().prop_recursive(5, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// How many nodes `value` has, itself included.
fn count_nodes(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count_nodes).sum(),
        Value::Object(map) => map.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// Replaces the `pick`-th node (in depth-first order) of `value` by `with`.
fn replace_node(value: &mut Value, pick: &mut usize, with: &Value) -> bool {
    if *pick == 0 {
        *value = with.clone();
        return true;
    }
    *pick -= 1;
    match value {
        Value::Array(items) => items.iter_mut().any(|v| replace_node(v, pick, with)),
        Value::Object(map) => map.values_mut().any(|v| replace_node(v, pick, with)),
        _ => false,
    }
}

fn wrap(message: &Value, enveloped: bool) -> Vec<u8> {
    if enveloped {
        serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": message.to_string()})).unwrap()
    } else {
        serde_json::to_vec(message).unwrap()
    }
}

/// Decodes and, when that succeeds, runs the message through an executor over the ledger:
/// neither may panic (proptest reports a panic as a failure, with the shrunk input).
fn never_panics(bytes: &[u8]) {
    let _ = decode(bytes, DecodeLimits::default());
    let executor = Executor::new(Settings::embedded(), Ledger::in_memory());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _ = runtime.block_on(executor.handle(Delivery { body: bytes, redelivered: false }));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fuzz_random_json_in_every_layer_never_panics(
        value in any_json(),
        event_type in prop_oneof![
            Just("compute.instance.create.end"), Just("compute.instance.delete.end"),
            Just("compute.instance.finish_resize.end"), Just("instance.create.end"), Just("metering"),
            Just("telemetry.polling"), Just("identity.project.created"), Just("identity.project.deleted"),
            Just("orchestration.stack.create.end"), Just("image.update"),
        ],
        layer in 0u8..3,
    ) {
        let bytes = match layer {
            // The value as the whole body.
            0 => serde_json::to_vec(&value).unwrap(),
            // The value as the payload of a handled event type.
            1 => wrap(&json!({"message_id": "m", "event_type": event_type, "timestamp": "2025-03-03 09:00:00",
                "publisher_id": "compute.x", "priority": "INFO", "payload": value}), true),
            // The value as the inner message.
            _ => wrap(&value, true),
        };
        never_panics(&bytes);
    }

    #[test]
    fn fuzz_real_messages_with_a_node_replaced_never_panic(
        pick in any::<prop::sample::Index>(),
        node in any::<prop::sample::Index>(),
        with in any_json(),
        enveloped in any::<bool>(),
    ) {
        let corpus = corpus();
        let mut message = corpus[pick.index(corpus.len())].clone();
        let mut at = node.index(count_nodes(&message));
        replace_node(&mut message, &mut at, &with);
        never_panics(&wrap(&message, enveloped));
    }

    #[test]
    fn fuzz_real_bodies_with_bytes_spliced_in_never_panic(
        pick in any::<prop::sample::Index>(),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 0..8), any::<bool>()), 1..6),
        enveloped in any::<bool>(),
    ) {
        let corpus = corpus();
        let mut bytes = wrap(&corpus[pick.index(corpus.len())], enveloped);
        for (at, insert, truncate) in cuts {
            let i = at.index(bytes.len().max(1)).min(bytes.len());
            if truncate {
                bytes.truncate(i);
            } else {
                bytes.splice(i..i, insert);
            }
        }
        never_panics(&bytes);
    }

    #[test]
    fn fuzz_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        never_panics(&bytes);
    }
}
