//! Notification → Concertim updates: device and rack statuses, metrics, team refreshes. Pure,
//! like the billing plan.

use std::collections::BTreeMap;

use super::{MetricValue, Status, Update, Work};
use crate::{
    config::Settings,
    event::{Event, Instance, InstanceAction, InstanceId, Notification, ProjectId, Stack},
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
        // Not admitted, or nothing Concertim shows: named one by one, so a new kind of event is
        // a decision here rather than silently nothing.
        Event::ProjectCreated { .. }
        | Event::ProjectDeleted { .. }
        | Event::ProjectUpdated { .. }
        | Event::Identity(_)
        | Event::Resource(_)
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
