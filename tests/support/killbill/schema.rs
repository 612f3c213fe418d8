//! The request schema checker: request bodies against the definitions of
//! `../shared/killbill/killbill-openapi.json`, ignoring its `required` lists (known to be wrong),
//! as the real server would accept or reject them.

use axum::http::Method;
use serde_json::{json, Value};

use super::model::parse_time;

/// The OpenAPI definitions, for checking request bodies (read once per process).
fn spec() -> Option<&'static Value> {
    static SPEC: std::sync::OnceLock<Option<Value>> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/killbill/killbill-openapi.json");
        let text = std::fs::read_to_string(&path).ok()?;
        serde_json::from_str::<Value>(&text).ok().map(|s| s["definitions"].clone())
    })
    .as_ref()
}

/// The spec's definition of the body of a call (`Name[]` for a list of them), for the calls
/// whose body is checked.
fn definition(method: &Method, segments: &[&str]) -> Option<&'static str> {
    match (method, segments) {
        (&Method::POST, ["accounts"]) => Some("Account"),
        (&Method::POST, ["subscriptions"]) | (&Method::PUT, ["subscriptions", _]) => Some("Subscription"),
        (&Method::POST, ["usages"]) => Some("SubscriptionUsageRecord"),
        (&Method::POST, [_, _, "customFields"]) => Some("CustomField[]"),
        _ => None,
    }
}

/// What the spec finds wrong in the body of a call to `/1.0/kb/{segments}`, a line a problem;
/// nothing for a call whose body is not checked, or when the spec is not there.
pub(super) fn problems(method: &Method, segments: &[&str], body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let (Some(name), Some(definitions)) = (definition(method, segments), spec()) else { return problems };
    let schema = match name.strip_suffix("[]") {
        Some(item) => json!({"type": "array", "items": {"$ref": format!("#/definitions/{item}")}}),
        None => json!({"$ref": format!("#/definitions/{name}")}),
    };
    check(definitions, &schema, body, name, &mut problems);
    problems
}

/// Checks `value` against a schema of the spec; every problem is a line in `problems`.
fn check(definitions: &Value, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
    if value.is_null() {
        return;
    }
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/definitions/");
        return check(definitions, &definitions[name], value, at, problems);
    }
    let expected = schema["type"].as_str().unwrap_or("object");
    let ok = match expected {
        "string" => value.as_str().is_some_and(|s| match schema["format"].as_str() {
            Some("uuid") => s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4,
            // KillBill 0.22 takes days where the spec (0.24) says date-time.
            Some("date-time") => parse_time(Some(&s.to_owned())).is_some(),
            Some("date") => s.len() == 10,
            _ => schema["enum"].as_array().is_none_or(|e| e.iter().any(|v| v == value)),
        }),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => match value.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check(definitions, &schema["items"], item, &format!("{at}[{i}]"), problems);
                }
                true
            }
            None => false,
        },
        _ => match value.as_object() {
            Some(map) => {
                let properties = &schema["properties"];
                for (key, v) in map {
                    if properties.get(key).is_none() && schema.get("additionalProperties").is_none() {
                        problems.push(format!("{at}.{key}: not a property of the spec's definition"));
                    } else if let Some(p) = properties.get(key) {
                        check(definitions, p, v, &format!("{at}.{key}"), problems);
                    }
                }
                true
            }
            None => false,
        },
    };
    if !ok {
        problems.push(format!("{at}: {value} is not a {expected} ({schema})"));
    }
}
