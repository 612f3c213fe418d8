//! Hostile input through the real broker: bodies at and over the size limit, deeply nested
//! JSON in every layer, invalid UTF-8, and a wrong type in every field of every event kind of
//! the fixtures. Nothing may crash; exactly the messages the decoder refuses are dead-lettered,
//! each with its reason; and what the others bill in KillBill is what the ledger bills for them.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use concertim_billing::{
    billing::{Backend, KillBill, Ledger},
    config::Settings,
    executor::{Delivery, Executor, Outcome},
};
use serde_json::{json, Value};

use crate::{
    assert_same, dead_letters,
    support::{
        bus::{spawn_app, TestBus},
        deliveries,
        killbill::FakeKillBill,
        wait::eventually,
    },
    traffic::{envelope, publish_all, Message},
    Row, BROKER_LOCK,
};

/// The size limit of this scenario (`decode.max_body_bytes`): small enough to keep the run
/// short, large enough for the deep nesting to reach the parser.
const LIMIT: usize = 256 * 1024;

/// A hostile message and what it is.
pub struct Hostile {
    /// What was done to it, e.g. `compute.instance.create.end: payload.instance_id = 7`.
    pub label: String,
    /// The message.
    pub message: Message,
}

/// A fixture's message as a JSON value, and whether it came in an oslo 2.0 envelope.
fn inner(body: &[u8]) -> Option<(Value, bool)> {
    let outer: Value = serde_json::from_slice(body).ok()?;
    match outer.get("oslo.message").and_then(Value::as_str) {
        Some(text) => Some((serde_json::from_str(text).ok()?, true)),
        None => Some((outer, false)),
    }
}

/// Gives every id-like string (32 hex digits, or a uuid) a fresh value, the same one for each
/// occurrence, so that each hostile message bills objects of its own.
fn fresh_ids(value: &mut Value, map: &mut BTreeMap<String, String>, n: usize) {
    match value {
        Value::String(s) => {
            let hex = s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit());
            let uuid = s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4;
            if hex || uuid {
                let next = map.len();
                let new = map.entry(s.clone()).or_insert_with(|| {
                    if hex {
                        format!("{:08x}{:012x}{:012x}", 0xbad, n, next)
                    } else {
                        // n in full: two messages of different projects never name one instance.
                        format!("{:08x}-4000-4000-8000-{:06x}{:06x}", 0xbad, n & 0xff_ffff, next)
                    }
                });
                *s = new.clone();
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| fresh_ids(v, map, n)),
        Value::Object(map_) => map_.values_mut().for_each(|v| fresh_ids(v, map, n)),
        _ => {}
    }
}

/// Every path to a node (objects fully, arrays through their first element).
fn paths(value: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                at.push(k.clone());
                out.push(at.clone());
                paths(v, at, out);
                at.pop();
            }
        }
        Value::Array(items) if !items.is_empty() => {
            at.push("0".into());
            out.push(at.clone());
            paths(&items[0], at, out);
            at.pop();
        }
        _ => {}
    }
}

fn node<'a>(value: &'a mut Value, path: &[String]) -> &'a mut Value {
    path.iter().fold(value, |v, key| match v {
        Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
        other => &mut other[key.as_str()],
    })
}

/// Values of a type other than `value`'s; the number is `n`, so that an id replaced by a number
/// still names objects of this message only.
fn wrong_types(value: &Value, n: usize) -> Vec<Value> {
    match value {
        Value::String(_) => vec![json!(n), json!(true), json!([]), json!({})],
        Value::Number(_) => vec![json!("7x"), json!(true), json!([]), json!({})],
        Value::Bool(_) => vec![json!("x"), json!(1)],
        Value::Null => vec![json!([1]), json!({"a": 1})],
        Value::Array(_) => vec![json!("x"), json!({}), json!(1)],
        Value::Object(_) => vec![json!("x"), json!([]), json!(1)],
    }
}

fn label_of(value: &Value) -> String {
    value.to_string().chars().take(12).collect()
}

/// The fixtures' event kinds: the first message of each (exchange, event type) the test
/// bindings carry.
fn kinds(bus: &TestBus) -> Vec<(String, String, Value, bool)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for d in deliveries("").into_iter().filter(|d| bus.routes(d)) {
        let Some((message, enveloped)) = inner(&d.body) else { continue };
        let Some(event_type) = message["event_type"].as_str().map(str::to_owned) else { continue };
        let exchange = d.exchange.clone().unwrap_or_default();
        if seen.insert((exchange.clone(), event_type)) {
            out.push((exchange, d.routing_key.clone().unwrap_or_default(), message, enveloped));
        }
    }
    out
}

/// Every hostile message of the scenario.
pub fn hostile(bus: &TestBus) -> Vec<Hostile> {
    let mut out = Vec::new();
    let kinds = kinds(bus);
    let mut n = 0;
    let mut push = |label: String, exchange: &str, routing_key: &str, body: Vec<u8>| {
        out.push(Hostile {
            label,
            message: Message { exchange: exchange.into(), routing_key: routing_key.into(), body },
        });
    };
    for (exchange, routing_key, template, enveloped) in &kinds {
        let event_type = template["event_type"].as_str().unwrap().to_owned();
        let mut all = Vec::new();
        paths(template, &mut Vec::new(), &mut all);
        for path in all {
            let original = node(&mut template.clone(), &path).clone();
            n += 1;
            for wrong in wrong_types(&original, n) {
                n += 1;
                let mut m = template.clone();
                fresh_ids(&mut m, &mut BTreeMap::new(), n);
                if path[0] != "message_id" {
                    m["message_id"] = json!(format!("hostile-{n}"));
                }
                let label = format!("{event_type}: {} = {}", path.join("."), label_of(&wrong));
                *node(&mut m, &path) = wrong;
                let body = if *enveloped { envelope(&m) } else { serde_json::to_vec(&m).unwrap() };
                push(label, exchange, routing_key, body);
            }
        }
    }
    // A Ceilometer message to pad, and a Nova one to nest into.
    let (_, _, metering, _) = kinds.iter().find(|k| k.2["event_type"] == "metering").unwrap();
    let (_, _, create, _) = kinds.iter().find(|k| k.2["event_type"] == "compute.instance.create.end").unwrap();
    let mut sized = |label: &str, size: usize| {
        let mut m = metering.clone();
        fresh_ids(&mut m, &mut BTreeMap::new(), 1_000_000 + size);
        m["message_id"] = json!(format!("sized-{size}"));
        let mut body = envelope(&m);
        assert!(body.len() <= size);
        body.resize(size, b' ');
        push(format!("{label} ({size} bytes)"), "ceilometer", "metering.sample", body);
    };
    sized("exactly at the size limit", LIMIT);
    sized("one byte over the size limit", LIMIT + 1);
    sized("four times the size limit", LIMIT * 4);
    for depth in [129, 10_000, 100_000] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        for (place, nested) in [("arrays", &arrays), ("objects", &objects)] {
            let label = |at: &str| format!("{depth} nested {place} in {at}");
            push(label("the whole body"), "nova", "notifications.info", nested.clone().into_bytes());
            let outer = format!("{{\"oslo.version\": \"2.0\", \"x\": {nested}, \"oslo.message\": \"{{}}\"}}");
            push(label("an unknown envelope key"), "nova", "notifications.info", outer.into_bytes());
            for (at, key) in [
                ("the payload", "payload"),
                ("an unknown message key", "_context_deep"),
                ("payload.metadata", "metadata"),
                ("payload.instance_id", "instance_id"),
            ] {
                let mut m = create.clone();
                fresh_ids(&mut m, &mut BTreeMap::new(), 2_000_000 + depth);
                m["message_id"] = json!(format!("deep-{depth}-{place}-{key}"));
                let marker = "\"__deep__\"";
                if key == "payload" || key == "_context_deep" {
                    m[key] = json!("__deep__");
                } else {
                    m["payload"][key] = json!("__deep__");
                }
                let text = m.to_string().replace(marker, nested);
                let body = serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": text})).unwrap();
                push(label(at), "nova", "notifications.info", body);
            }
            let mut m = metering.clone();
            m["message_id"] = json!(format!("deep-{depth}-{place}-metadata"));
            m["payload"][0]["resource_metadata"] = json!("__deep__");
            let text = m.to_string().replace("\"__deep__\"", nested);
            let body = serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": text})).unwrap();
            push(label("a sample's resource_metadata"), "ceilometer", "metering.sample", body);
        }
    }
    // Invalid UTF-8: raw bytes in each layer, and an escaped lone surrogate in the inner one.
    let mut m = create.clone();
    fresh_ids(&mut m, &mut BTreeMap::new(), 3_000_000);
    m["message_id"] = json!("utf8");
    m["payload"]["display_name"] = json!("__bad__");
    m["_context_user_name"] = json!("__bad__");
    let text = m.to_string();
    for (label, bytes) in [
        ("0xff in the body, outside any string", &b"\xff"[..]),
        ("0xc3 0x28 (a broken two-byte sequence) in a string", &b"\xc3\x28"[..]),
        ("an overlong encoding of '/' in a string", &b"\xc0\xaf"[..]),
        ("a UTF-16 surrogate encoded in UTF-8 in a string", &b"\xed\xa0\x80"[..]),
    ] {
        let outer = format!("{{\"oslo.version\": \"2.0\", \"oslo.message\": {}}}", json!(text));
        let mut body = outer.replace("__bad__", "@@").into_bytes();
        let at = body.windows(2).position(|w| w == b"@@").unwrap();
        body.splice(at..at + 2, bytes.iter().copied());
        push(format!("invalid UTF-8: {label}"), "nova", "notifications.info", body.clone());
        if label.contains("outside") {
            let mut start = envelope(&m);
            start.splice(0..0, bytes.iter().copied());
            push("invalid UTF-8: 0xff before the body".into(), "nova", "notifications.info", start);
        }
    }
    let surrogate = text.replace("\"__bad__\"", "\"\\udc80 lone\"");
    let body = serde_json::to_vec(&json!({"oslo.version": "2.0", "oslo.message": surrogate})).unwrap();
    push("invalid UTF-8: an escaped lone surrogate in the inner message".into(), "nova", "notifications.info", body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_never_crashes_and_exactly_the_refused_messages_are_dead_lettered_with_reasons() {
    let _shared = BROKER_LOCK.read().await;
    let fake = FakeKillBill::start().await;
    let mut bus = TestBus::new("faults-hostile").await;
    bus.settings.decode.max_body_bytes = LIMIT;
    bus.settings.bus.prefetch = 64;
    bus.settings.bus.lanes = 8;
    let messages = hostile(&bus);

    // What the decoder makes of each, offline, through the ledger: the reference.
    let mut settings: Settings = Settings::embedded();
    settings.decode.max_body_bytes = LIMIT;
    let offline = Executor::new(settings, Ledger::in_memory());
    let mut refused: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    let mut accepted = Vec::new();
    for h in &messages {
        match offline.handle(Delivery { body: &h.message.body, redelivered: false }).await {
            Outcome::Invalid(e) => {
                refused.insert(h.message.body.clone(), e.to_string());
            }
            // A mutated project id naming another project's instance: refused, as invalid.
            outcome @ Outcome::Failed { .. }
                if outcome.class() == Some(concertim_billing::class::ErrorClass::Invalid) =>
            {
                refused.insert(h.message.body.clone(), outcome.reason().unwrap_or_default());
            }
            Outcome::Failed { error, .. } => panic!("{}: the ledger failed: {error}", h.label),
            _ => accepted.push(h.label.as_str()),
        }
    }
    let must_refuse = |h: &&Hostile| {
        h.label.contains("over the size limit")
            || h.label.contains("four times")
            || h.label.contains(": message_id = ")
            || h.label.contains(": event_type = ")
            || h.label.contains("whole body")
    };
    for h in messages.iter().filter(must_refuse) {
        assert!(refused.contains_key(&h.message.body), "{} was accepted", h.label);
    }
    let at_limit = messages.iter().find(|h| h.label.starts_with("exactly at")).unwrap();
    assert!(!refused.contains_key(&at_limit.message.body), "a body exactly at the limit is accepted");

    let app = spawn_app(&bus, Backend::KillBill(KillBill::new(fake.settings()).unwrap()), None).await;
    let all: Vec<Message> = messages.iter().map(|h| h.message.clone()).collect();
    publish_all(&bus, &all).await;
    let published = Instant::now();
    let names = bus.names();
    eventually("every hostile message handled", Duration::from_secs(300), || async {
        let done = bus.depth(&names.queue).await == 0
            && bus.depth(&names.retry_queue).await == 0
            && bus.depth(&names.dead_queue).await as usize >= refused.len();
        done.then_some(())
    })
    .await;
    let recovered = published.elapsed();
    app.shutdown().await.expect("the consumer stopped cleanly (no input crashed it)");

    let dead = dead_letters(&bus).await;
    for d in &dead {
        let label = messages.iter().find(|h| h.message.body == d.body).map_or("?", |h| h.label.as_str());
        let reason = refused.get(&d.body).unwrap_or_else(|| panic!("{label} was dead-lettered: {}", d.reason));
        assert_eq!(d.class, "invalid", "{label}");
        assert!(d.reason.contains(reason.as_str()), "{label}: {} / {reason}", d.reason);
    }
    assert_eq!(dead.len(), refused.len(), "every refused message is dead-lettered once");
    let ledger = offline.billing().snapshot();
    let kb = fake.snapshot();
    assert_same("hostile", &kb, &ledger);
    eprintln!(
        "hostile: {} messages, {} refused, {} accepted (wrong types the decoder tolerates, or in fields billing \
         does not read):",
        messages.len(),
        refused.len(),
        accepted.len()
    );
    for label in &accepted {
        eprintln!("  accepted: {label}");
    }
    Row {
        scenario: "hostile input",
        messages: messages.len(),
        faults: format!(
            "size limit ±1 byte and ×4, nesting 129/10k/100k deep in 7 places, invalid UTF-8 ×6, \
             {} wrong-typed field values over {} event kinds",
            messages.len() - 3 - 42 - 6,
            kinds(&bus).len()
        ),
        lost: 0,
        duplicated: 0,
        dead_lettered: dead.len(),
        recovered,
    }
    .print();
    bus.cleanup().await;
}
