//! Heat `orchestration.stack.<action>.<phase>` payloads.
//!
//! `stack_identity` is the stack uuid since Liberty; older releases sent an ARN
//! (`arn:openstack:heat::<tenant>:stacks/<name>/<id>`), whose last path segment is the uuid.

use serde::Deserialize;
#[cfg(test)]
use serde_json::value::RawValue;

use super::{bounded, id, PayloadError, Source};
use crate::event::{Event, ProjectId, Stack, StackId};
use crate::fields;

#[derive(Deserialize)]
struct Payload {
    #[serde(default, deserialize_with = "fields::opt_text")]
    stack_identity: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    tenant_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    stack_name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    state: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    state_reason: Option<String>,
}

/// As [`decode_from`], from a payload already read as raw JSON.
#[cfg(test)]
pub(super) fn decode(rest: &str, raw: &RawValue) -> Result<Event, PayloadError> {
    decode_from(rest, raw)
}

/// Decodes the part of the event type after `orchestration.stack.`.
pub(super) fn decode_from<'de>(_rest: &str, payload: impl Source<'de>) -> Result<Event, PayloadError> {
    let p: Payload = payload.object()?;
    let stack_id = p.stack_identity.map(|s| match s.rsplit_once('/') {
        Some((_, last)) if s.starts_with("arn:") => last.to_owned(),
        _ => s,
    });
    Ok(Event::Stack(Stack {
        id: id("payload.stack_identity", stack_id, StackId::parse)?,
        project: id("payload.tenant_id", p.tenant_id, ProjectId::parse)?,
        name: bounded(p.stack_name.as_deref().unwrap_or_default(), 255),
        state: bounded(p.state.as_deref().unwrap_or_default(), 64),
        reason: bounded(p.state_reason.as_deref().unwrap_or_default(), 1024),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arn_stack_identities_give_the_stack_uuid() {
        let raw = RawValue::from_string(
            r#"{"stack_identity":"arn:openstack:heat::t1:stacks/web/0f5e7ad4-5e07-4a2d-9bb5-4e4e0bd0e2a1","tenant_id":"t1","stack_name":"web","state":"CREATE_COMPLETE"}"#.to_owned(),
        )
        .unwrap();
        let Ok(Event::Stack(stack)) = decode("create.end", &raw) else { panic!() };
        assert_eq!(stack.id.as_str(), "0f5e7ad4-5e07-4a2d-9bb5-4e4e0bd0e2a1");
        assert_eq!(stack.state, "CREATE_COMPLETE");
    }
}
