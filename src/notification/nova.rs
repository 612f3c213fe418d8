//! Nova `compute.instance.*` (legacy, flat payload) and `instance.*` (versioned,
//! `nova_object.data` with a nested flavor object) payloads.
//!
//! Only the fields billing and Concertim need are read; unknown fields are ignored, as Nova's
//! versioning rules ask of consumers. Legacy Nova writes `""` (or `"None"`) for unset dates and
//! numbers; versioned Nova writes `null`.

use serde::Deserialize;
#[cfg(test)]
use serde_json::value::RawValue;

use super::{bounded, id, opt_time, PayloadError, Source};
use crate::event::{Event, Flavor, Instance, InstanceAction, InstanceId, ProjectId, Step, UserId};
use crate::fields;

#[derive(Deserialize)]
struct Legacy {
    #[serde(default, deserialize_with = "fields::opt_text")]
    instance_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    tenant_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    user_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    display_name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    instance_type: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    instance_flavor_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_u32")]
    vcpus: Option<u32>,
    #[serde(default, deserialize_with = "fields::opt_u64")]
    memory_mb: Option<u64>,
    #[serde(default, deserialize_with = "fields::opt_u64")]
    root_gb: Option<u64>,
    #[serde(default, deserialize_with = "fields::opt_u64")]
    ephemeral_gb: Option<u64>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    state: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    state_description: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    audit_period_beginning: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    audit_period_ending: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    created_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    launched_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    deleted_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    terminated_at: Option<String>,
}

#[derive(Deserialize)]
struct Versioned {
    #[serde(rename = "nova_object.data")]
    data: VersionedData,
}

#[derive(Deserialize)]
struct VersionedData {
    #[serde(default, deserialize_with = "fields::opt_text")]
    uuid: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    tenant_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    user_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    display_name: Option<String>,
    #[serde(default)]
    flavor: Option<VersionedFlavor>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    state: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    task_state: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    power_state: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    created_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    launched_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    deleted_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    terminated_at: Option<String>,
    #[serde(default)]
    audit_period: Option<VersionedAudit>,
}

#[derive(Deserialize)]
struct VersionedAudit {
    #[serde(rename = "nova_object.data")]
    data: AuditData,
}

#[derive(Deserialize)]
struct AuditData {
    #[serde(default, deserialize_with = "fields::opt_text")]
    audit_period_beginning: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    audit_period_ending: Option<String>,
}

#[derive(Deserialize)]
struct VersionedFlavor {
    #[serde(rename = "nova_object.data")]
    data: FlavorData,
}

#[derive(Deserialize)]
struct FlavorData {
    #[serde(default, deserialize_with = "fields::opt_text")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    flavorid: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_u32")]
    vcpus: Option<u32>,
    #[serde(default, deserialize_with = "fields::opt_u64")]
    memory_mb: Option<u64>,
    #[serde(default, deserialize_with = "fields::opt_u64")]
    root_gb: Option<u64>,
    #[serde(default, deserialize_with = "fields::opt_u64")]
    ephemeral_gb: Option<u64>,
}

/// What a step (the event name after `compute.instance.` or `instance.`, one spelling per
/// format where they differ) means for the timeline. `exists` is handled by the caller, which
/// reads the audit window.
fn step(rest: &str) -> Step {
    use crate::timeline::Held;
    match rest {
        "create.end" | "finish_resize.end" | "resize_finish.end" | "resize.revert.end" | "resize_revert.end"
        | "rebuild.end" | "rescue.end" | "unshelve.end" => Step::Launched,
        "delete.start" | "delete.end" => Step::Deleting,
        "power_on.end" | "resume.end" | "unpause.end" | "restore.end" | "unrescue.end" => Step::Entered(Held::Running),
        "power_off.end" | "shelve.end" => Step::Entered(Held::Stopped),
        "suspend.end" | "pause.end" => Step::Entered(Held::Suspended),
        "shelve_offload.end" => Step::Entered(Held::Offloaded),
        "soft_delete.end" => Step::Entered(Held::SoftDeleted),
        _ => Step::Other,
    }
}

/// The audit window of an `exists`, or the step of any other event.
fn step_with_audit(rest: &str, begin: Option<&str>, end: Option<&str>) -> Result<Step, PayloadError> {
    if rest != "exists" {
        return Ok(step(rest));
    }
    let begin = opt_time("payload.audit_period_beginning", begin)?;
    let end = opt_time("payload.audit_period_ending", end)?;
    Ok(match begin.zip(end) {
        Some((begin, end)) if begin <= end => Step::Audit { begin, end },
        _ => Step::Other,
    })
}

/// Legacy event names (after `compute.instance.`) that change billing.
fn legacy_action(rest: &str) -> InstanceAction {
    match rest {
        "create.end" => InstanceAction::Created,
        // A reverted resize puts the old flavor back in the flavor fields: a plan change too.
        "finish_resize.end" | "resize.revert.end" => InstanceAction::Resized,
        // soft_delete can be restored; billing stops at the real delete.end (reclaim).
        "delete.end" => InstanceAction::Deleted,
        _ => InstanceAction::StateChanged,
    }
}

/// Versioned event names (after `instance.`) that change billing.
fn versioned_action(rest: &str) -> InstanceAction {
    match rest {
        "create.end" => InstanceAction::Created,
        "resize_finish.end" | "resize_revert.end" => InstanceAction::Resized,
        "delete.end" => InstanceAction::Deleted,
        _ => InstanceAction::StateChanged,
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty() && v != "None")
}

/// As [`decode_legacy_from`], from a payload already read as raw JSON.
#[cfg(test)]
pub(super) fn decode_legacy(rest: &str, raw: &RawValue) -> Result<Event, PayloadError> {
    decode_legacy_from(rest, raw)
}

/// Decodes a legacy `compute.instance.<rest>` payload.
pub(super) fn decode_legacy_from<'de>(rest: &str, payload: impl Source<'de>) -> Result<Event, PayloadError> {
    let p: Legacy = payload.object()?;
    let instance = Instance {
        id: id("payload.instance_id", p.instance_id, InstanceId::parse)?,
        project: id("payload.tenant_id", p.tenant_id, ProjectId::parse)?,
        user: non_empty(p.user_id).map(UserId::parse).transpose().ok().flatten(),
        display_name: bounded(p.display_name.as_deref().unwrap_or_default(), 255),
        flavor: Flavor {
            name: bounded(p.instance_type.as_deref().unwrap_or_default(), 255),
            id: non_empty(p.instance_flavor_id),
            vcpus: p.vcpus,
            memory_mb: p.memory_mb,
            root_gb: p.root_gb,
            ephemeral_gb: p.ephemeral_gb,
        },
        vm_state: bounded(p.state.as_deref().unwrap_or_default(), 64),
        task_state: non_empty(p.state_description).map(|s| bounded(&s, 64)),
        power_state: None,
        created_at: opt_time("payload.created_at", p.created_at.as_deref())?,
        launched_at: opt_time("payload.launched_at", p.launched_at.as_deref())?,
        deleted_at: opt_time("payload.deleted_at", p.deleted_at.as_deref())?,
        terminated_at: opt_time("payload.terminated_at", p.terminated_at.as_deref())?,
        step: step_with_audit(rest, p.audit_period_beginning.as_deref(), p.audit_period_ending.as_deref())?,
    };
    Ok(Event::Instance { action: legacy_action(rest), instance: Box::new(instance) })
}

/// As [`decode_versioned_from`], from a payload already read as raw JSON.
#[cfg(test)]
pub(super) fn decode_versioned(rest: &str, raw: &RawValue) -> Result<Event, PayloadError> {
    decode_versioned_from(rest, raw)
}

/// Decodes a versioned `instance.<rest>` payload.
pub(super) fn decode_versioned_from<'de>(rest: &str, payload: impl Source<'de>) -> Result<Event, PayloadError> {
    let Versioned { data: p } = payload.object()?;
    let flavor = p.flavor.map(|f| f.data);
    let instance = Instance {
        id: id("payload.nova_object.data.uuid", p.uuid, InstanceId::parse)?,
        project: id("payload.nova_object.data.tenant_id", p.tenant_id, ProjectId::parse)?,
        user: non_empty(p.user_id).map(UserId::parse).transpose().ok().flatten(),
        display_name: bounded(p.display_name.as_deref().unwrap_or_default(), 255),
        flavor: match flavor {
            Some(f) => Flavor {
                name: bounded(f.name.as_deref().unwrap_or_default(), 255),
                id: non_empty(f.flavorid),
                vcpus: f.vcpus,
                memory_mb: f.memory_mb,
                root_gb: f.root_gb,
                ephemeral_gb: f.ephemeral_gb,
            },
            None => Flavor {
                name: String::new(),
                id: None,
                vcpus: None,
                memory_mb: None,
                root_gb: None,
                ephemeral_gb: None,
            },
        },
        vm_state: bounded(p.state.as_deref().unwrap_or_default(), 64),
        task_state: non_empty(p.task_state).map(|s| bounded(&s, 64)),
        power_state: non_empty(p.power_state).map(|s| bounded(&s, 64)),
        created_at: opt_time("payload.created_at", p.created_at.as_deref())?,
        launched_at: opt_time("payload.launched_at", p.launched_at.as_deref())?,
        deleted_at: opt_time("payload.deleted_at", p.deleted_at.as_deref())?,
        terminated_at: opt_time("payload.terminated_at", p.terminated_at.as_deref())?,
        step: {
            let audit = p.audit_period.map(|a| a.data);
            let (begin, end) = audit.map_or((None, None), |a| (a.audit_period_beginning, a.audit_period_ending));
            step_with_audit(rest, begin.as_deref(), end.as_deref())?
        },
    };
    Ok(Event::Instance { action: versioned_action(rest), instance: Box::new(instance) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    const LEGACY: &str = r#"{"instance_id":"9f9d01b9-4a58-4271-9e27-398b21ab20d1","tenant_id":"7c150a59fe714e6f9263774af9688f0e",
        "user_id":"u1","display_name":"testme","instance_type":"m1.tiny","instance_flavor_id":"1","vcpus":1,"memory_mb":512,
        "root_gb":0,"state":"active","state_description":"","created_at":"2012-05-08 20:23:41","launched_at":"2012-05-08 20:23:47.985999",
        "deleted_at":"","terminated_at":""}"#;

    #[test]
    fn legacy_create_end_reads_flat_flavor_and_treats_empty_dates_as_unset() {
        let Event::Instance { action, instance } = decode_legacy("create.end", &raw(LEGACY)).ok().unwrap() else {
            panic!("not an instance event")
        };
        assert_eq!(action, InstanceAction::Created);
        assert_eq!(instance.flavor.name, "m1.tiny");
        assert_eq!(instance.flavor.vcpus, Some(1));
        assert_eq!(instance.task_state, None);
        assert_eq!(instance.deleted_at, None);
        assert_eq!(instance.launched_at.unwrap().to_rfc3339(), "2012-05-08T20:23:47.985999Z");
    }

    #[test]
    fn versioned_payload_reads_nested_flavor() {
        let body = r#"{"nova_object.name":"InstanceActionPayload","nova_object.version":"1.8","nova_object.data":{
            "uuid":"178b0921-8f85-4257-88b6-2e743b5a975c","tenant_id":"6f70656e737461636b20342065766572","user_id":"fake",
            "display_name":"some-server","state":"active","task_state":null,"power_state":"running",
            "launched_at":"2012-10-29T13:42:11Z","deleted_at":null,
            "flavor":{"nova_object.name":"FlavorPayload","nova_object.data":{"name":"test_flavor","flavorid":"a22d","vcpus":1,"memory_mb":512,"root_gb":1}}}}"#;
        let Event::Instance { action, instance } = decode_versioned("resize_finish.end", &raw(body)).ok().unwrap()
        else {
            panic!("not an instance event")
        };
        assert_eq!(action, InstanceAction::Resized);
        assert_eq!(instance.flavor.name, "test_flavor");
        assert_eq!(instance.power_state.as_deref(), Some("running"));
    }

    #[test]
    fn a_missing_instance_id_or_tenant_is_an_error() {
        assert!(decode_legacy("create.end", &raw(r#"{"tenant_id":"t"}"#)).is_err());
        assert!(decode_legacy("create.end", &raw(r#"{"instance_id":"i"}"#)).is_err());
        assert!(decode_versioned("create.end", &raw(r#"{"nova_object.data":{"uuid":"i"}}"#)).is_err());
    }

    #[test]
    fn wrong_types_are_errors_not_panics() {
        assert!(decode_legacy("create.end", &raw(r#"{"instance_id":"i","tenant_id":"t","vcpus":"many"}"#)).is_err());
        assert!(
            decode_legacy("create.end", &raw(r#"{"instance_id":"i","tenant_id":"t","launched_at":"soon"}"#)).is_err()
        );
        assert!(decode_legacy("create.end", &raw(r#"[1,2]"#)).is_err());
        assert!(decode_versioned("create.end", &raw(r#"{"nova_object.data":[]}"#)).is_err());
    }
}
