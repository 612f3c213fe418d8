//! Cinder `volume.*` and `snapshot.*`, Neutron `floatingip.*` and Glance `image.*` payloads.
//!
//! Only the steps that change what a resource holds are read, plus the volume steps Concertim
//! shows (attach, detach, update); every other step of these services is ignored without
//! parsing its payload. Cinder sends flat payloads (`volume_id`, `tenant_id`, `size` in GiB,
//! `launched_at`); Neutron nests the floating IP under `floatingip` and names only its id in
//! `floatingip.delete.end`; Glance sends the image (`id`, `owner`, `size` in bytes,
//! `visibility` or the older `is_public`).

use serde::Deserialize;
#[cfg(test)]
use serde_json::value::RawValue;

use super::{bounded, id, opt_time, PayloadError, Source};
use crate::event::{Event, InstanceId, ProjectId, Resource, ResourceKind, ResourceStep};
use crate::fields;

/// Which resource step an event type is, when it is one this service reads.
pub(super) fn step_of(event_type: &str) -> Option<(ResourceKind, ResourceStep)> {
    use ResourceKind::{FloatingIp, Image, Snapshot, Volume};
    use ResourceStep::{Associated, Changed, Created, Deleted, Other};
    Some(match event_type {
        "volume.create.end" => (Volume, Created),
        "volume.resize.end" | "volume.retype" => (Volume, Changed),
        "volume.delete.end" => (Volume, Deleted),
        "volume.attach.end" | "volume.detach.end" | "volume.update.end" => (Volume, Other),
        "snapshot.create.end" => (Snapshot, Created),
        "snapshot.delete.end" => (Snapshot, Deleted),
        "floatingip.create.end" => (FloatingIp, Created),
        "floatingip.update.end" | "floatingip.associate.end" | "floatingip.disassociate.end" => {
            (FloatingIp, Associated)
        }
        "floatingip.delete.end" => (FloatingIp, Deleted),
        "image.upload" | "image.activate" => (Image, Created),
        "image.delete" => (Image, Deleted),
        _ => return None,
    })
}

#[derive(Deserialize)]
struct Cinder {
    #[serde(default, deserialize_with = "fields::opt_text")]
    volume_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    snapshot_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    tenant_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    display_name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    volume_type: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_u64")]
    size: Option<u64>,
    #[serde(default, deserialize_with = "fields::opt_u64")]
    volume_size: Option<u64>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    status: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    created_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    launched_at: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    deleted_at: Option<String>,
    #[serde(default)]
    volume_attachment: Vec<Attachment>,
}

#[derive(Deserialize)]
struct Attachment {
    #[serde(default, deserialize_with = "fields::opt_text")]
    instance_uuid: Option<String>,
}

#[derive(Deserialize)]
struct Neutron {
    #[serde(default)]
    floatingip: Option<FloatingIp>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    floatingip_id: Option<String>,
}

#[derive(Deserialize)]
struct FloatingIp {
    #[serde(default, deserialize_with = "fields::opt_text")]
    id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    tenant_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    project_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    port_id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    floating_ip_address: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    status: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    created_at: Option<String>,
}

#[derive(Deserialize)]
struct Glance {
    #[serde(default, deserialize_with = "fields::opt_text")]
    id: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    owner: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    name: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_u64")]
    size: Option<u64>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    status: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    visibility: Option<String>,
    #[serde(default)]
    is_public: Option<bool>,
    #[serde(default, deserialize_with = "fields::opt_text")]
    deleted_at: Option<String>,
}

/// As [`decode_from`], from a payload already read as raw JSON.
#[cfg(test)]
pub(super) fn decode(event_type: &str, raw: &RawValue) -> Result<Event, PayloadError> {
    decode_from(event_type, raw)
}

/// Decodes the payload of an event type that [`step_of`] names.
pub(super) fn decode_from<'de>(event_type: &str, payload: impl Source<'de>) -> Result<Event, PayloadError> {
    let Some((kind, step)) = step_of(event_type) else {
        return Ok(Event::Ignored { reason: "unhandled event type" });
    };
    let resource = match kind {
        ResourceKind::Volume | ResourceKind::Snapshot => cinder(kind, step, payload.object()?)?,
        ResourceKind::FloatingIp => neutron(step, payload.object()?)?,
        _ => glance(step, payload.object()?)?,
    };
    Ok(Event::Resource(Box::new(resource)))
}

fn project(field: &'static str, value: Option<String>) -> Result<ProjectId, PayloadError> {
    id(field, non_empty(value), ProjectId::parse)
}

fn cinder(kind: ResourceKind, step: ResourceStep, p: Cinder) -> Result<Resource, PayloadError> {
    let volume = kind == ResourceKind::Volume;
    let (id_field, raw_id) =
        if volume { ("payload.volume_id", p.volume_id) } else { ("payload.snapshot_id", p.snapshot_id) };
    let launched = opt_time("payload.launched_at", p.launched_at.as_deref())?;
    let created = opt_time("payload.created_at", p.created_at.as_deref())?;
    Ok(Resource {
        kind,
        id: id(id_field, non_empty(raw_id), InstanceId::parse)?,
        project: Some(project("payload.tenant_id", p.tenant_id)?),
        display_name: bounded(p.display_name.as_deref().unwrap_or_default(), 255),
        type_name: non_empty(p.volume_type).filter(|_| volume).map(|t| bounded(&t, 255)),
        size: if volume { p.size } else { p.volume_size },
        status: bounded(p.status.as_deref().unwrap_or_default(), 64),
        // A volume holds its space from launched_at (Cinder's own usage audit starts there).
        created_at: if volume { launched.or(created) } else { created },
        deleted_at: opt_time("payload.deleted_at", p.deleted_at.as_deref())?,
        associated: None,
        public: false,
        attached_to: p
            .volume_attachment
            .into_iter()
            .find_map(|a| non_empty(a.instance_uuid))
            .and_then(|i| InstanceId::parse(i).ok()),
        step,
    })
}

fn neutron(step: ResourceStep, p: Neutron) -> Result<Resource, PayloadError> {
    let Some(ip) = p.floatingip else {
        // `floatingip.delete.end` names only the id: its project is the one its create named.
        if step != ResourceStep::Deleted {
            return Err(PayloadError::Shape("an object with a floatingip object"));
        }
        let id = id("payload.floatingip_id", non_empty(p.floatingip_id), InstanceId::parse)?;
        return Ok(Resource::named(ResourceKind::FloatingIp, id, step));
    };
    Ok(Resource {
        kind: ResourceKind::FloatingIp,
        id: id("payload.floatingip.id", non_empty(ip.id), InstanceId::parse)?,
        project: Some(project("payload.floatingip.tenant_id", non_empty(ip.project_id).or(ip.tenant_id))?),
        display_name: bounded(ip.floating_ip_address.as_deref().unwrap_or_default(), 255),
        type_name: None,
        size: None,
        status: bounded(ip.status.as_deref().unwrap_or_default(), 64),
        created_at: opt_time("payload.floatingip.created_at", ip.created_at.as_deref())?,
        deleted_at: None,
        associated: Some(non_empty(ip.port_id).is_some()),
        public: false,
        attached_to: None,
        step,
    })
}

fn glance(step: ResourceStep, p: Glance) -> Result<Resource, PayloadError> {
    let public = p.visibility.as_deref().map_or(p.is_public == Some(true), |v| v == "public");
    Ok(Resource {
        kind: ResourceKind::Image,
        id: id("payload.id", non_empty(p.id), InstanceId::parse)?,
        // A public image may have no owner: it is billed to nobody anyway.
        project: if public {
            non_empty(p.owner).and_then(|o| ProjectId::parse(o).ok())
        } else {
            Some(project("payload.owner", p.owner)?)
        },
        display_name: bounded(p.name.as_deref().unwrap_or_default(), 255),
        type_name: None,
        size: p.size,
        status: bounded(p.status.as_deref().unwrap_or_default(), 64),
        // Glance's created_at is when the record was made, before any data: an image holds
        // storage from its upload, the notification's own time.
        created_at: None,
        deleted_at: opt_time("payload.deleted_at", p.deleted_at.as_deref())?,
        associated: None,
        public,
        attached_to: None,
        step,
    })
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty() && v != "None")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    fn resource(event_type: &str, json: &str) -> Resource {
        match decode(event_type, &raw(json)) {
            Ok(Event::Resource(r)) => *r,
            other => panic!("{event_type}: {other:?}", other = other.err().map(|e| e.into_decode(event_type))),
        }
    }

    #[test]
    fn a_volume_is_held_from_its_launched_at_with_its_size_and_type() {
        let r = resource(
            "volume.resize.end",
            r#"{"volume_id":"v-1","tenant_id":"p-1","size":"20","volume_type":"ssd","status":"available",
                "created_at":"2026-01-01T10:00:00+00:00","launched_at":"2026-01-01T10:00:02.5+00:00"}"#,
        );
        assert_eq!(
            (r.kind, r.step, r.size, r.type_name.as_deref()),
            (ResourceKind::Volume, ResourceStep::Changed, Some(20), Some("ssd"))
        );
        assert_eq!(r.created_at.unwrap().to_rfc3339(), "2026-01-01T10:00:02.5Z");
    }

    #[test]
    fn a_floating_ip_delete_names_only_its_id_and_any_other_step_without_the_object_is_invalid() {
        let r = resource("floatingip.delete.end", r#"{"floatingip_id":"f-1"}"#);
        assert_eq!((r.id.as_str(), r.project), ("f-1", None));
        assert!(decode("floatingip.create.end", &raw(r#"{"floatingip_id":"f-1"}"#)).is_err());
    }

    #[test]
    fn a_floating_ip_is_associated_when_it_names_a_port_and_its_project_id_wins() {
        let r = resource(
            "floatingip.update.end",
            r#"{"floatingip":{"id":"f-1","tenant_id":"old","project_id":"p-1","port_id":"port-1"}}"#,
        );
        assert_eq!((r.associated, r.project.unwrap().as_str()), (Some(true), "p-1"));
    }

    #[test]
    fn a_public_image_needs_no_owner_and_a_private_one_does() {
        let r = resource("image.activate", r#"{"id":"i-1","visibility":"public","size":1024}"#);
        assert!(r.public);
        let r = resource("image.upload", r#"{"id":"i-1","is_public":true,"owner":"p-1","size":1024}"#);
        assert!(r.public);
        assert!(decode("image.upload", &raw(r#"{"id":"i-1","visibility":"private","size":1}"#)).is_err());
    }

    #[test]
    fn other_steps_of_these_services_are_ignored_unread() {
        assert!(matches!(decode("volume.create.start", &raw("[1]")), Ok(Event::Ignored { .. })));
        assert!(step_of("image.update").is_none());
        assert!(step_of("port.create.end").is_none());
    }
}
