//! Conformance over the upstream corpus (`../shared/upstream-notifications`): every sample
//! decodes, to the event its event type calls for or to a deliberate "ignored", never an error.
//!
//! The corpus holds samples in several forms; each is normalised to the body a consumer would
//! receive: oslo 2.0 envelopes as they are, bare 1.0 messages as they are (with a `message_id`
//! and `timestamp` added where the sample left them out), AMQP 1.0 bodies unwrapped from
//! `{"request": envelope}`, Searchlight's listener form (`{name: {event_type, payload,
//! publisher_id, metadata}}`) rebuilt as messages, notigen templates with their `[[[[…]]]]`
//! placeholders filled in, and Nova's versioned samples with `$ref` resolved (and compared with
//! the corpus's own resolved twins). YAML files are covered by their `.flattened.json` twins.

use std::path::{Path, PathBuf};

use concertim_billing::{
    event::{Event, IdentityChange, InstanceAction, ResourceKind, ResourceStep},
    notification::{decode, DecodeLimits},
};
use serde_json::{json, Map, Value};

use crate::support::upstream_corpus;

/// One message extracted from a corpus file.
pub(crate) struct Case {
    pub(crate) label: String,
    /// The message dict (bare form) the body carries, for cross-checks.
    pub(crate) message: Value,
    pub(crate) body: Vec<u8>,
}

#[test]
fn every_upstream_sample_decodes_to_the_event_its_type_calls_for() {
    let Some(corpus) = upstream_corpus() else { return };
    let mut files = Vec::new();
    walk(&corpus, &mut files);
    let mut checked = 0;
    let mut failures = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&corpus).unwrap().display().to_string();
        for case in cases(&corpus, file, &rel) {
            checked += 1;
            if let Err(why) = check(&case) {
                failures.push(format!("{}: {why}", case.label));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} samples failed:\n{}", failures.len(), failures.join("\n"));
    // The corpus has well over a hundred files; a walk that finds few means a broken walk.
    assert!(checked > 200, "only {checked} samples found under {}", corpus.display());
    eprintln!("conformance: {checked} upstream samples decoded as expected");
}

#[test]
fn nova_versioned_samples_with_refs_decode_like_their_resolved_twins() {
    let Some(corpus) = upstream_corpus() else { return };
    let versioned = corpus.join("nova/versioned");
    let mut compared = 0;
    for entry in std::fs::read_dir(&versioned).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let twin = corpus.join("nova/versioned-resolved").join(path.file_name().unwrap());
        let resolved = resolve_refs(&versioned, read_json(&path));
        let expected = read_json(&twin);
        assert_eq!(resolved, expected, "{} resolves differently from its twin", path.display());
        let a = decode(&bare_body(resolved, "twin"), DecodeLimits::default()).unwrap();
        let b = decode(&bare_body(expected, "twin"), DecodeLimits::default()).unwrap();
        assert_eq!(a.event, b.event, "{}", path.display());
        compared += 1;
    }
    assert!(compared > 100, "only {compared} versioned samples found");
}

/// What the decoder must produce for an event type, and a cross-check against the raw message.
fn check(case: &Case) -> Result<(), String> {
    let notification = decode(&case.body, DecodeLimits::default()).map_err(|e| format!("decode error: {e}"))?;
    let event_type = case.message["event_type"].as_str().unwrap_or_default();
    let payload = &case.message["payload"];
    let event = &notification.event;
    let kind = expected_kind(event_type);
    let ok = match (kind, event) {
        (Kind::ProjectCreated, Event::ProjectCreated { project })
        | (Kind::ProjectUpdated, Event::ProjectUpdated { project })
        | (Kind::ProjectDeleted, Event::ProjectDeleted { project }) => {
            let expected = payload["resource_info"].as_str().unwrap_or_default();
            (project.as_str() == expected).then_some(()).ok_or(format!("project {project} != {expected}"))
        }
        (Kind::User, Event::Identity(IdentityChange::User { .. }))
        | (Kind::RoleAssignment, Event::Identity(IdentityChange::RoleAssignment { .. }))
        | (Kind::Stack, Event::Stack(_))
        | (Kind::Ignored, Event::Ignored { .. }) => Ok(()),
        // Keystone events other than projects, users and role assignments (authenticate, …).
        (Kind::OtherIdentity, Event::Ignored { .. }) => Ok(()),
        (Kind::Instance(action), Event::Instance { action: got, instance }) if *got == action => {
            let data = payload.get("nova_object.data").unwrap_or(payload);
            let expected = data["instance_id"].as_str().or(data["uuid"].as_str()).unwrap_or_default();
            (instance.id.as_str() == expected).then_some(()).ok_or(format!("instance {} != {expected}", instance.id))
        }
        (Kind::Resource(kind, step), Event::Resource(resource)) if resource.kind == kind && resource.step == step => {
            let object = payload.get("floatingip").unwrap_or(payload);
            let expected = ["volume_id", "snapshot_id", "floatingip_id", "id"]
                .iter()
                .find_map(|key| object[*key].as_str().filter(|_| key_of(kind, key)))
                .unwrap_or_default();
            (resource.id.as_str() == expected).then_some(()).ok_or(format!("resource {} != {expected}", resource.id))
        }
        (Kind::Usage, Event::Usage { samples, unattributed }) => {
            let list = payload.as_array().or(payload["samples"].as_array()).map_or(0, Vec::len);
            (samples.len() + unattributed == list && list > 0)
                .then_some(())
                .ok_or(format!("{} samples + {unattributed} unattributed != {list}", samples.len()))
        }
        _ => Err(format!("expected {kind:?}")),
    };
    ok.map_err(|why| format!("{event_type}: {why}; decoded {event:?}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ProjectCreated,
    ProjectUpdated,
    ProjectDeleted,
    User,
    RoleAssignment,
    OtherIdentity,
    Instance(InstanceAction),
    Usage,
    Stack,
    Resource(ResourceKind, ResourceStep),
    Ignored,
}

/// Which payload key holds a kind's id.
fn key_of(kind: ResourceKind, key: &str) -> bool {
    matches!(
        (kind, key),
        (ResourceKind::Volume, "volume_id")
            | (ResourceKind::Snapshot, "snapshot_id")
            | (ResourceKind::FloatingIp, "floatingip_id" | "id")
            | (ResourceKind::Image, "id")
    )
}

/// The event table, written independently of the decoder.
fn expected_kind(event_type: &str) -> Kind {
    if let Some(rest) = event_type.strip_prefix("identity.") {
        return match rest {
            "project.created" => Kind::ProjectCreated,
            "project.updated" => Kind::ProjectUpdated,
            "project.deleted" => Kind::ProjectDeleted,
            r if r.starts_with("user.") => Kind::User,
            r if r.starts_with("role_assignment.") => Kind::RoleAssignment,
            _ => Kind::OtherIdentity,
        };
    }
    let instance = |action| Kind::Instance(action);
    if let Some(rest) = event_type.strip_prefix("compute.instance.") {
        return instance(match rest {
            "create.end" => InstanceAction::Created,
            "finish_resize.end" | "resize.revert.end" => InstanceAction::Resized,
            "delete.end" => InstanceAction::Deleted,
            _ => InstanceAction::StateChanged,
        });
    }
    if let Some(rest) = event_type.strip_prefix("instance.") {
        return instance(match rest {
            "create.end" => InstanceAction::Created,
            "resize_finish.end" | "resize_revert.end" => InstanceAction::Resized,
            "delete.end" => InstanceAction::Deleted,
            _ => InstanceAction::StateChanged,
        });
    }
    let resource = |kind, step| Kind::Resource(kind, step);
    match event_type {
        "volume.create.end" => resource(ResourceKind::Volume, ResourceStep::Created),
        "volume.resize.end" | "volume.retype" => resource(ResourceKind::Volume, ResourceStep::Changed),
        "volume.delete.end" => resource(ResourceKind::Volume, ResourceStep::Deleted),
        "volume.attach.end" | "volume.detach.end" | "volume.update.end" => {
            resource(ResourceKind::Volume, ResourceStep::Other)
        }
        "snapshot.create.end" => resource(ResourceKind::Snapshot, ResourceStep::Created),
        "snapshot.delete.end" => resource(ResourceKind::Snapshot, ResourceStep::Deleted),
        "floatingip.create.end" => resource(ResourceKind::FloatingIp, ResourceStep::Created),
        "floatingip.update.end" | "floatingip.associate.end" | "floatingip.disassociate.end" => {
            resource(ResourceKind::FloatingIp, ResourceStep::Associated)
        }
        "floatingip.delete.end" => resource(ResourceKind::FloatingIp, ResourceStep::Deleted),
        "image.upload" | "image.activate" => resource(ResourceKind::Image, ResourceStep::Created),
        "image.delete" => resource(ResourceKind::Image, ResourceStep::Deleted),
        "metering" | "telemetry.polling" => Kind::Usage,
        t if t.starts_with("orchestration.stack.") => Kind::Stack,
        _ => Kind::Ignored,
    }
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_str().unwrap();
        if path.is_dir() {
            // Fragments for `$ref`, not notifications.
            if name != "common_payloads" {
                walk(&path, files);
            }
        } else if name.ends_with(".json") {
            files.push(path);
        }
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every message a corpus file holds, normalised to the body a consumer would receive.
pub(crate) fn cases(corpus: &Path, file: &Path, rel: &str) -> Vec<Case> {
    if rel.contains("notigen-templates") {
        let text = fill_placeholders(&std::fs::read_to_string(file).unwrap());
        let list: Vec<Value> = serde_json::from_str(&text).unwrap();
        // The first element is the generator's metadata.
        return list.into_iter().skip(1).enumerate().map(|(i, m)| bare_case(format!("{rel}[{}]", i + 1), m)).collect();
    }
    let value = read_json(file);
    if rel.starts_with("nova/versioned/") {
        let resolved = resolve_refs(&corpus.join("nova/versioned"), value);
        return vec![bare_case(rel.to_owned(), resolved)];
    }
    let Value::Object(map) = value else { panic!("{rel}: unexpected top-level JSON") };
    if let Some(Value::Object(request)) = map.get("request") {
        // AMQP 1.0 driver: {"request": <oslo 2.0 envelope>, "context": {...}}.
        return vec![envelope_case(rel.to_owned(), Value::Object(request.clone()))];
    }
    if map.contains_key("oslo.message") {
        return vec![envelope_case(rel.to_owned(), Value::Object(map))];
    }
    if map.contains_key("event_type") {
        return vec![bare_case(rel.to_owned(), Value::Object(map))];
    }
    // Searchlight's listener form: {name: {event_type, payload, publisher_id, ctxt, metadata}}.
    map.into_iter()
        .map(|(name, entry)| {
            let mut message = Map::new();
            for key in ["event_type", "payload", "publisher_id"] {
                message.insert(key.into(), entry[key].clone());
            }
            let metadata = &entry["metadata"];
            message.insert("message_id".into(), metadata["message_id"].clone());
            message.insert("timestamp".into(), metadata["timestamp"].clone());
            message.insert("priority".into(), json!("INFO"));
            bare_case(format!("{rel}#{name}"), Value::Object(message))
        })
        .collect()
}

fn envelope_case(label: String, envelope: Value) -> Case {
    let message: Value = serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    Case { label, message, body: serde_json::to_vec(&envelope).unwrap() }
}

fn bare_case(label: String, message: Value) -> Case {
    let body = bare_body(message.clone(), &label);
    Case { label, message, body }
}

/// A bare message as a body, with the `message_id` and `timestamp` every real message has
/// (Nova's documentation samples and some captures leave them out).
fn bare_body(mut message: Value, label: &str) -> Vec<u8> {
    let map = message.as_object_mut().unwrap();
    if map.get("message_id").is_none_or(Value::is_null) {
        let id: String = label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        map.insert("message_id".into(), json!(id));
    }
    if map.get("timestamp").is_none_or(Value::is_null) {
        map.insert("timestamp".into(), json!("2025-01-01 00:00:00.000000"));
    }
    serde_json::to_vec(&message).unwrap()
}

/// Resolves nova's `{"$ref": "common_payloads/X.json#", ...overrides}` (paths relative to the
/// file holding the reference, `base`): the referenced
/// fragment (itself resolved), with the overrides merged in depth.
fn resolve_refs(base: &Path, value: Value) -> Value {
    match value {
        Value::Object(mut map) => {
            if let Some(Value::String(reference)) = map.remove("$ref") {
                let path = base.join(reference.trim_end_matches('#'));
                // A fragment's own references are relative to the fragment.
                let target = resolve_refs(path.parent().unwrap(), read_json(&path));
                let overrides = resolve_refs(base, Value::Object(map));
                return merge(target, overrides);
            }
            Value::Object(map.into_iter().map(|(k, v)| (k, resolve_refs(base, v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(|v| resolve_refs(base, v)).collect()),
        other => other,
    }
}

fn merge(base: Value, overrides: Value) -> Value {
    match (base, overrides) {
        (Value::Object(mut base), Value::Object(overrides)) => {
            for (key, value) in overrides {
                let merged = match base.remove(&key) {
                    Some(existing) => merge(existing, value),
                    None => value,
                };
                base.insert(key, merged);
            }
            Value::Object(base)
        }
        (_, overrides) => overrides,
    }
}

/// Fills notigen's `[[[[NAME]]]]` / `[[[[NAME_n]]]]` placeholders with values of the right kind.
fn fill_placeholders(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("[[[[") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 4..];
        let end = after.find("]]]]").expect("placeholders are closed");
        let name = &after[..end];
        let (kind, n) = match name.rsplit_once('_') {
            Some((kind, n)) if n.chars().all(|c| c.is_ascii_digit()) => (kind, n.parse::<u64>().unwrap()),
            _ => (name, 0),
        };
        let filled = match kind {
            "DT" => format!("2025-01-01 00:{:02}:{:02}.000000", n / 60 % 60, n % 60),
            "UUID" => format!("00000000-0000-4000-8000-{n:012}"),
            "XUUID" => format!("{n:032x}"),
            "V4" => format!("10.0.0.{}", n % 250 + 1),
            "V6" => format!("fe80::{n}"),
            other => other.to_ascii_lowercase(),
        };
        out.push_str(&filled);
        rest = &after[end + 4..];
    }
    out.push_str(rest);
    out
}
