//! Keystone `identity.*` payloads, basic and CADF.
//!
//! Both formats carry the resource id in `resource_info` (the field the formats share), which is
//! read first; CADF's `target.id` is the fallback, without the `openstack:` prefix older pycadf
//! releases added. Role assignments carry `project` or `domain` instead. A CADF outcome other than
//! `success` describes something that did not happen and is ignored.

use serde::Deserialize;
#[cfg(test)]
use serde_json::value::RawValue;

use super::{id, PayloadError, Source};
use crate::event::{Event, IdentityChange, ProjectId, RoleId, UserId};
use crate::fields;

#[derive(Deserialize)]
struct Payload {
    #[serde(default, deserialize_with = "fields::opt_text")]
    resource_info: Option<String>,
    #[serde(default)]
    target: Option<Target>,
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    project: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    user: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    role: Option<String>,
}

#[derive(Deserialize)]
struct Target {
    #[serde(default, deserialize_with = "fields::opt_text")]
    id: Option<String>,
}

impl Payload {
    fn resource_id(&self) -> Option<String> {
        self.resource_info.clone().or_else(|| {
            let id = self.target.as_ref()?.id.as_deref()?;
            Some(id.strip_prefix("openstack:").unwrap_or(id).to_owned())
        })
    }
}

/// As [`decode_from`], from a payload already read as raw JSON.
#[cfg(test)]
pub(super) fn decode(rest: &str, raw: &RawValue) -> Result<Event, PayloadError> {
    decode_from(rest, raw)
}

/// Decodes the part of the event type after `identity.`.
pub(super) fn decode_from<'de>(rest: &str, payload: impl Source<'de>) -> Result<Event, PayloadError> {
    let Some((resource, operation)) = rest.rsplit_once('.') else {
        return Ok(Event::Ignored { reason: "unhandled identity event" });
    };
    if !matches!(resource, "project" | "user" | "role_assignment")
        || !matches!(operation, "created" | "updated" | "deleted")
    {
        return Ok(Event::Ignored { reason: "unhandled identity event" });
    }
    let payload: Payload = payload.object()?;
    if payload.outcome.as_deref().is_some_and(|o| o != "success") {
        return Ok(Event::Ignored { reason: "identity event outcome is not success" });
    }
    Ok(match resource {
        "project" => {
            let project = id("payload.resource_info", payload.resource_id(), ProjectId::parse)?;
            match operation {
                "created" => Event::ProjectCreated { project },
                "updated" => Event::ProjectUpdated { project },
                _ => Event::ProjectDeleted { project },
            }
        }
        "user" => Event::Identity(IdentityChange::User {
            user: id("payload.resource_info", payload.resource_id(), UserId::parse)?,
            operation: operation.to_owned(),
        }),
        _ => Event::Identity(IdentityChange::RoleAssignment {
            project: payload.project.map(|p| id("payload.project", Some(p), ProjectId::parse)).transpose()?,
            user: payload.user.map(|u| id("payload.user", Some(u), UserId::parse)).transpose()?,
            role: payload.role.map(|r| id("payload.role", Some(r), RoleId::parse)).transpose()?,
            operation: operation.to_owned(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rest: &str, payload: &str) -> Event {
        let raw = RawValue::from_string(payload.to_owned()).unwrap();
        decode(rest, &raw).unwrap_or_else(|_| panic!("{rest} {payload}"))
    }

    #[test]
    fn basic_and_cadf_project_events_give_the_project_id() {
        let basic = run("project.created", r#"{"resource_info":"abc123"}"#);
        let cadf = run(
            "project.created",
            r#"{"typeURI":"http://schemas.dmtf.org/cloud/audit/1.0/event","outcome":"success","target":{"id":"abc123","typeURI":"data/security/project"},"resource_info":"abc123"}"#,
        );
        assert_eq!(basic, cadf);
        assert_eq!(basic, Event::ProjectCreated { project: ProjectId::parse("abc123").unwrap() });
    }

    #[test]
    fn cadf_target_id_is_the_fallback_without_its_openstack_prefix() {
        let e = run("project.deleted", r#"{"outcome":"success","target":{"id":"openstack:abc"}}"#);
        assert_eq!(e, Event::ProjectDeleted { project: ProjectId::parse("abc").unwrap() });
    }

    #[test]
    fn failed_outcomes_and_other_resources_are_ignored() {
        assert!(matches!(
            run("project.created", r#"{"outcome":"failure","resource_info":"a"}"#),
            Event::Ignored { .. }
        ));
        assert!(matches!(run("authenticate", r#"{}"#), Event::Ignored { .. }));
        assert!(matches!(run("group.updated", r#"{}"#), Event::Ignored { .. }));
    }

    #[test]
    fn a_project_event_without_an_id_is_an_error() {
        let raw = RawValue::from_string(r#"{"outcome":"success"}"#.to_owned()).unwrap();
        assert!(decode("project.created", &raw).is_err());
    }
}
