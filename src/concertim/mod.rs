//! Concertim, the second target of a notification: what the visualisation app should show.
//!
//! [`plan`] turns a decoded notification into [`Update`]s, purely, like the billing plan does.
//! The bus consumer publishes them, once billing is done, as one [`Work`] message on the
//! Concertim queue, and acknowledges the notification: from then on Concertim's availability
//! never holds billing up. The Concertim [`worker`] consumes that queue with its own retries and
//! dead-lettering, through the [`client`].
//!
//! Status maps follow `reference/original-service.md` §3, with the statuses Rails accepts per
//! device type: Instance `IN_PROGRESS FAILED ACTIVE STOPPED SUSPENDED`, rack `IN_PROGRESS FAILED
//! ACTIVE STOPPED`.

pub mod client;
pub mod worker;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    config::Settings,
    event::Notification,
    event::{Event, Instance, InstanceAction, InstanceId, ProjectId, Stack, StackId, Timestamp},
};

pub use client::{Client, ConcertimError};
pub use worker::Worker;

/// A status Concertim shows for a device or a rack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Running.
    Active,
    /// Stopped (or shelved).
    Stopped,
    /// Suspended (or paused); instances only.
    Suspended,
    /// A task is under way.
    InProgress,
    /// Failed, or a state nobody maps.
    Failed,
}

impl Status {
    /// The value Rails stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "ACTIVE",
            Status::Stopped => "STOPPED",
            Status::Suspended => "SUSPENDED",
            Status::InProgress => "IN_PROGRESS",
            Status::Failed => "FAILED",
        }
    }
}

/// One change to make in Concertim. Each is safe to repeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "update", rename_all = "snake_case")]
pub enum Update {
    /// Set `billing_acct_id` on the project's team to its billing account, then its figures.
    LinkTeam {
        /// The team's `project_id`.
        project: ProjectId,
    },
    /// Refresh the team's cost, credits and billing period from the billing application
    /// (debounced per project).
    RefreshTeam {
        /// The team's `project_id`.
        project: ProjectId,
    },
    /// Set the instance's device status, when it differs and this is not older than the last
    /// status applied.
    DeviceStatus {
        /// The device's `metadata.openstack_instance_id`.
        instance: InstanceId,
        /// The new status.
        status: Status,
        /// The notification's time, to keep a retried old status from overwriting a newer one.
        at: Timestamp,
    },
    /// The instance was deleted: delete its device.
    RemoveDevice {
        /// The device's `metadata.openstack_instance_id`.
        instance: InstanceId,
    },
    /// Set the stack's rack status.
    RackStatus {
        /// The rack's `metadata.openstack_stack_id`.
        stack: StackId,
        /// The new status.
        status: Status,
        /// The notification's time.
        at: Timestamp,
    },
    /// The stack was deleted: delete its rack (and what it still holds).
    RemoveRack {
        /// The rack's `metadata.openstack_stack_id`.
        stack: StackId,
    },
    /// Push live metric values to the metric reporting daemon for the instance's device.
    PushMetrics {
        /// The device's `metadata.openstack_instance_id`.
        instance: InstanceId,
        /// The values, in sample order.
        metrics: Vec<MetricValue>,
    },
}

impl Update {
    /// The project or resource it is about, in words, for logs and dead-letter reasons.
    pub fn describe(&self) -> String {
        match self {
            Update::LinkTeam { project } => format!("link team of project {project}"),
            Update::RefreshTeam { project } => format!("refresh team of project {project}"),
            Update::DeviceStatus { instance, status, .. } => format!("set device {instance} {}", status.as_str()),
            Update::RemoveDevice { instance } => format!("remove device {instance}"),
            Update::RackStatus { stack, status, .. } => format!("set rack {stack} {}", status.as_str()),
            Update::RemoveRack { stack } => format!("remove rack {stack}"),
            Update::PushMetrics { instance, .. } => format!("push metrics of {instance}"),
        }
    }

    /// The metric label of its kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Update::LinkTeam { .. } => "link_team",
            Update::RefreshTeam { .. } => "refresh_team",
            Update::DeviceStatus { .. } => "device_status",
            Update::RemoveDevice { .. } => "remove_device",
            Update::RackStatus { .. } => "rack_status",
            Update::RemoveRack { .. } => "remove_rack",
            Update::PushMetrics { .. } => "push_metrics",
        }
    }
}

/// One value for the metric reporting daemon (`PUT /mrd/{device}/metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricValue {
    /// Metric name.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Units.
    pub units: String,
    /// MRD type (`double`, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// MRD slope.
    pub slope: String,
    /// Seconds the value stays current.
    pub ttl: u32,
}

/// The body of a message on the Concertim queue: the updates of one notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Work {
    /// The notification's `message_id`.
    pub message_id: String,
    /// The notification's `event_type`.
    pub event_type: String,
    /// The project, when the notification has one: the lane key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<ProjectId>,
    /// The updates, in order.
    pub updates: Vec<Update>,
}

impl Work {
    /// The message body.
    pub fn to_body(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

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
        _ => Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Flavor, MessageId, Meta, Sample};

    fn settings() -> Settings {
        let text = format!(
            "{}\n[concertim]\nurl = \"http://c\"\nusername = \"admin\"\npassword = \"p\"\n[concertim.metrics.cpu_util]\nname = \"cpu_load\"\nunits = \"%\"\n",
            crate::config::DEFAULT_TOML
        );
        Settings::from_toml(&text, "t").unwrap()
    }

    fn ts(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap()
    }

    fn notification(event: Event) -> Notification {
        Notification {
            meta: Meta {
                message_id: MessageId::parse("m1").unwrap(),
                event_type: "t".into(),
                publisher_id: "p".into(),
                priority: "INFO".into(),
                timestamp: ts("2025-01-01T00:00:00Z"),
            },
            event,
        }
    }

    fn instance(vm_state: &str, task: Option<&str>) -> Box<Instance> {
        Box::new(Instance {
            id: InstanceId::parse("i-1").unwrap(),
            project: ProjectId::parse("p-1").unwrap(),
            user: None,
            display_name: String::new(),
            flavor: Flavor { name: "m1".into(), id: None, vcpus: None, memory_mb: None, root_gb: None },
            vm_state: vm_state.into(),
            task_state: task.map(str::to_owned),
            power_state: None,
            created_at: None,
            launched_at: None,
            deleted_at: None,
            terminated_at: None,
        })
    }

    #[test]
    fn the_device_map_covers_the_reference_states_and_treats_any_task_as_in_progress() {
        let cases = [
            ("active", None, Status::Active),
            ("stopped", None, Status::Stopped),
            ("suspended", None, Status::Suspended),
            ("building", Some("spawning"), Status::InProgress),
            ("active", Some("powering-off"), Status::InProgress),
            ("active", Some("rebooting"), Status::InProgress),
            ("active", Some(""), Status::Active),
            ("error", None, Status::Failed),
            ("shelved_offloaded", None, Status::Stopped),
        ];
        for (vm, task, expected) in cases {
            assert_eq!(device_status(&instance(vm, task)), expected, "{vm} {task:?}");
        }
    }

    #[test]
    fn heat_states_map_to_rack_statuses_and_failures_are_not_dropped() {
        assert_eq!(rack_status("CREATE_COMPLETE"), Some(Status::Active));
        assert_eq!(rack_status("RESUME_COMPLETE"), Some(Status::Active));
        assert_eq!(rack_status("SUSPEND_COMPLETE"), Some(Status::Stopped));
        assert_eq!(rack_status("CREATE_IN_PROGRESS"), Some(Status::InProgress));
        assert_eq!(rack_status("CREATE_FAILED"), Some(Status::Failed));
        assert_eq!(rack_status("DELETE_FAILED"), Some(Status::Failed));
        assert_eq!(rack_status("DELETE_COMPLETE"), None);
        assert_eq!(rack_status("nonsense"), Some(Status::Failed));
    }

    #[test]
    fn without_a_concertim_section_nothing_is_planned() {
        let n = notification(Event::ProjectCreated { project: ProjectId::parse("p").unwrap() });
        assert!(plan(&n, &Settings::embedded()).is_empty());
        assert_eq!(plan(&n, &settings()).len(), 2);
    }

    #[test]
    fn a_delete_removes_the_device_and_other_instance_events_set_its_status() {
        let deleted =
            notification(Event::Instance { action: InstanceAction::Deleted, instance: instance("deleted", None) });
        assert_eq!(plan(&deleted, &settings()), [Update::RemoveDevice { instance: InstanceId::parse("i-1").unwrap() }]);
        let off =
            notification(Event::Instance { action: InstanceAction::StateChanged, instance: instance("stopped", None) });
        assert!(matches!(plan(&off, &settings())[..], [Update::DeviceStatus { status: Status::Stopped, .. }]));
    }

    #[test]
    fn samples_push_mapped_metrics_per_instance_and_refresh_each_billed_project_once() {
        let sample = |meter: &str, volume: i64| Sample {
            meter: meter.into(),
            volume: volume.into(),
            unit: "x".into(),
            timestamp: ts("2025-01-01T00:00:00Z"),
            project: ProjectId::parse("p-1").unwrap(),
            resource: InstanceId::parse("i-1").unwrap(),
            flavor_name: None,
            display_name: None,
            launched_at: None,
            created_at: None,
        };
        let n = notification(Event::Usage {
            samples: vec![sample("cpu_util", 42), sample("vcpus", 2), sample("memory", 512)],
            unattributed: 0,
        });
        let updates = plan(&n, &settings());
        assert_eq!(updates.len(), 2, "{updates:?}");
        let Update::PushMetrics { metrics, .. } = &updates[0] else { panic!("{updates:?}") };
        assert_eq!((metrics[0].name.as_str(), metrics[0].value, metrics[0].ttl), ("cpu_load", 42.0, 3600));
        assert_eq!(updates[1], Update::RefreshTeam { project: ProjectId::parse("p-1").unwrap() });
    }

    #[test]
    fn work_round_trips_through_its_body() {
        let n = notification(Event::ProjectCreated { project: ProjectId::parse("p").unwrap() });
        let work = work(&n, &settings()).unwrap();
        let again: Work = serde_json::from_slice(&work.to_body()).unwrap();
        assert_eq!(again, work);
    }
}
