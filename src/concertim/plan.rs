//! Notification → Concertim updates: device and rack statuses, metrics, team refreshes. Pure,
//! like the billing plan.

use std::collections::BTreeMap;

use super::{MetricValue, Status, Update, Work};
use crate::{
    config::Settings,
    event::{
        Event, IdentityChange, Instance, InstanceAction, InstanceId, Notification, ProjectId, Resource, ResourceKind,
        ResourceStep, Stack, Timestamp,
    },
};

/// The device status a Nova notification's state fields give. A task under way wins over the
/// vm state; `reference/original-service.md` §3 maps a few task names, every other task is
/// in progress too (the Python service called a rebooting server FAILED).
pub fn device_status(instance: &Instance) -> Status {
    if instance.power_state.as_deref() == Some("crashed") {
        return Status::Failed;
    }
    if let Some(task) = instance.task_state.as_deref().filter(|t| !t.is_empty() && *t != "none") {
        return match task {
            "active" | "running" => Status::Active,
            "stopped" => Status::Stopped,
            "suspended" => Status::Suspended,
            _ => Status::InProgress,
        };
    }
    match instance.vm_state.as_str() {
        "active" | "running" | "resized" | "rescued" => Status::Active,
        "stopped" | "shelved" | "shelved_offloaded" | "soft-delete" | "soft_deleted" => Status::Stopped,
        "suspended" | "paused" => Status::Suspended,
        "building"
        | "deleting"
        | "scheduling"
        | "networking"
        | "block_device_mapping"
        | "spawning"
        | "deleted"
        | "powering-on"
        | "powering-off"
        | "suspending"
        | "creating"
        | "maintenance" => Status::InProgress,
        _ => Status::Failed,
    }
}

/// The status of a volume's device, from Cinder's `status` as sent.
///
/// `reference/original-service.md` §3 (the original service's full-sync map, which it applied
/// to volumes too): ACTIVE ← `in-use`; AVAILABLE ← `available`; IN_PROGRESS ← `creating`,
/// `attaching`, `detaching`, `maintenance`, `reserved`, `downloading`, `deleting`; anything else
/// FAILED. Cinder's other transitional states (`extending`, `uploading`, `retyping`,
/// `backing-up`, `restoring-backup`, `awaiting-transfer`, `managing`) are IN_PROGRESS here, not
/// FAILED as that map leaves them: each is a task under way on a healthy volume, ending in
/// `available` or `in-use` (or an `error…` state), as the instance map treats any task.
pub fn volume_status(volume: &Resource) -> Status {
    match volume.status.to_ascii_lowercase().as_str() {
        "in-use" => Status::Active,
        "available" => Status::Available,
        "creating" | "attaching" | "detaching" | "maintenance" | "reserved" | "downloading" | "deleting" => {
            Status::InProgress
        }
        "extending" | "uploading" | "retyping" | "backing-up" | "restoring-backup" | "awaiting-transfer"
        | "managing" => Status::InProgress,
        // `error`, `error_deleting`, `error_extending`, `error_restoring`, `error_backing-up`,
        // `error_managing`, and whatever a later Cinder adds.
        _ => Status::Failed,
    }
}

/// The Concertim updates of a resource notification. Only volumes are devices in Concertim
/// (type Volume, created by the original service from a stack's `OS::Cinder::Volume`);
/// snapshots, floating IPs, images and network interfaces have no record there, so they change
/// nothing.
fn resource_updates(resource: &Resource, at: Timestamp, settings: &Settings) -> Vec<Update> {
    if resource.project.as_ref().is_some_and(|p| !settings.projects.admits(p)) {
        return Vec::new();
    }
    match resource.kind {
        ResourceKind::Volume => match resource.step {
            ResourceStep::Deleted => vec![Update::RemoveDevice { instance: resource.id.clone() }],
            ResourceStep::Created | ResourceStep::Changed | ResourceStep::Associated | ResourceStep::Other => {
                vec![Update::DeviceStatus { instance: resource.id.clone(), status: volume_status(resource), at }]
            }
        },
        // Concertim has no record of a snapshot, floating IP or image: the original service made
        // devices only of a stack's servers, `OS::Cinder::Volume`s and `OS::Neutron::Net`s. They
        // are billed and not shown. Instances and their interfaces never come as resource events.
        ResourceKind::Snapshot
        | ResourceKind::FloatingIp
        | ResourceKind::Image
        | ResourceKind::NetworkInterface
        | ResourceKind::Instance => Vec::new(),
    }
}

/// What a Heat stack state means for its rack: a status, or `None` when the stack is gone.
pub fn rack_status(state: &str) -> Option<Status> {
    Some(match state {
        "DELETE_COMPLETE" => return None,
        "SUSPEND_COMPLETE" => Status::Stopped,
        s if s.ends_with("_IN_PROGRESS") => Status::InProgress,
        s if s.ends_with("_FAILED") => Status::Failed,
        s if s.ends_with("_COMPLETE") => Status::Active,
        _ => Status::Failed,
    })
}

/// Plans the Concertim updates of one notification. Pure, like the billing plan.
pub fn plan(notification: &Notification, settings: &Settings) -> Vec<Update> {
    let Some(concertim) = &settings.concertim else { return Vec::new() };
    let admits = |p: &ProjectId| settings.projects.admits(p);
    let at = notification.meta.timestamp;
    match &notification.event {
        Event::ProjectCreated { project } if admits(project) => {
            vec![Update::LinkTeam { project: project.clone() }, Update::RefreshTeam { project: project.clone() }]
        }
        // Admitted to the managed scope: its account exists from now on.
        Event::Identity(IdentityChange::RoleAssignment { project: Some(project), user, role, operation })
            if operation == "created"
                && admits(project)
                && settings.projects.managed_by.as_ref().is_some_and(|m| m.is(user.as_ref(), role.as_ref())) =>
        {
            vec![Update::LinkTeam { project: project.clone() }, Update::RefreshTeam { project: project.clone() }]
        }
        // The team keeps the closed account's final figures: what the project cost.
        Event::ProjectDeleted { project } if admits(project) => vec![Update::RefreshTeam { project: project.clone() }],
        Event::Instance { action: InstanceAction::Deleted, instance } => {
            vec![Update::RemoveDevice { instance: instance.id.clone() }]
        }
        Event::Instance { instance, .. } => {
            vec![Update::DeviceStatus { instance: instance.id.clone(), status: device_status(instance), at }]
        }
        Event::Stack(Stack { id, state, .. }) => match rack_status(state) {
            Some(status) => vec![Update::RackStatus { stack: id.clone(), status, at }],
            None => vec![Update::RemoveRack { stack: id.clone() }],
        },
        Event::Usage { samples, .. } => {
            let mut updates = Vec::new();
            let mut metrics: BTreeMap<&InstanceId, Vec<MetricValue>> = BTreeMap::new();
            let mut order = Vec::new();
            let mut billed: Vec<&ProjectId> = Vec::new();
            for sample in samples {
                if let Some(rule) = concertim.metrics.get(&sample.meter) {
                    let entry = metrics.entry(&sample.resource).or_default();
                    if entry.is_empty() {
                        order.push(&sample.resource);
                    }
                    entry.push(MetricValue {
                        name: rule.name.clone(),
                        value: rust_decimal::prelude::ToPrimitive::to_f64(&sample.volume).unwrap_or(0.0),
                        units: rule.units.clone(),
                        kind: rule.kind.clone(),
                        slope: rule.slope.clone(),
                        ttl: rule.ttl,
                    });
                }
                if settings.billing.meters.contains_key(&sample.meter)
                    && admits(&sample.project)
                    && !billed.contains(&&sample.project)
                {
                    billed.push(&sample.project);
                }
            }
            for instance in order {
                let values = metrics.remove(instance).unwrap_or_default();
                updates.push(Update::PushMetrics { instance: instance.clone(), metrics: values });
            }
            updates.extend(billed.into_iter().map(|p| Update::RefreshTeam { project: p.clone() }));
            updates
        }
        Event::Resource(resource) => resource_updates(resource, at, settings),
        // Not admitted, or nothing Concertim shows: named one by one, so a new kind of event is
        // a decision here rather than silently nothing.
        Event::ProjectCreated { .. }
        | Event::ProjectDeleted { .. }
        | Event::ProjectUpdated { .. }
        | Event::Identity(_)
        | Event::Ignored { .. } => Vec::new(),
    }
}

/// The Concertim work of a notification, or `None` when there is nothing to show.
pub fn work(notification: &Notification, settings: &Settings) -> Option<Work> {
    let updates = plan(notification, settings);
    (!updates.is_empty()).then(|| Work {
        message_id: notification.meta.message_id.to_string(),
        event_type: notification.meta.event_type.clone(),
        project: notification.event.project().cloned(),
        updates,
    })
}
