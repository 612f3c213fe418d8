//! Concertim, the second target of a notification: what the visualisation app should show.
//!
//! [`plan`] turns a decoded notification into [`Update`]s, purely, like the billing plan does.
//! The bus consumer publishes them, once billing is done, as one [`Work`] message on the
//! Concertim queue, and acknowledges the notification: from then on Concertim's availability
//! never holds billing up. The Concertim [`worker`] consumes that queue with its own retries and
//! dead-lettering, through the [`client`].
//!
//! Status maps follow `reference/original-service.md` §3, with the statuses Rails accepts per
//! device type: Instance `IN_PROGRESS FAILED ACTIVE STOPPED SUSPENDED`, Volume `IN_PROGRESS
//! FAILED ACTIVE AVAILABLE`, rack `IN_PROGRESS FAILED ACTIVE STOPPED`.

pub mod client;
mod plan;
pub mod worker;

use serde::{Deserialize, Serialize};

use crate::event::{InstanceId, ProjectId, StackId, Timestamp};

pub use client::{Client, ConcertimError};
pub use plan::{device_status, plan, rack_status, volume_status, work};
pub use worker::Worker;

/// A status Concertim shows for a device or a rack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Running (an instance, a rack), or attached to an instance (a volume).
    Active,
    /// Stopped (or shelved).
    Stopped,
    /// Suspended (or paused); instances only.
    Suspended,
    /// Created and attached to nothing; volumes only (an attached volume is `Active`).
    Available,
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
            Status::Available => "AVAILABLE",
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
    /// Set the status of an instance's or a volume's device, when it differs and this is not
    /// older than the last status applied.
    DeviceStatus {
        /// The device's `metadata.openstack_instance_id`: the Nova instance's id, or the Cinder
        /// volume's (the original service keeps every device's OpenStack id under that key).
        instance: InstanceId,
        /// The new status.
        status: Status,
        /// The notification's time, to keep a retried old status from overwriting a newer one.
        at: Timestamp,
    },
    /// The instance or volume was deleted: delete its device.
    RemoveDevice {
        /// The device's `metadata.openstack_instance_id` (instance or volume id).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Settings,
        event::{
            Event, Flavor, Instance, InstanceAction, MessageId, Meta, Notification, ProjectId, Resource, ResourceKind,
            ResourceStep, Sample,
        },
    };

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
                project_name: None,
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
            flavor: Flavor {
                name: "m1".into(),
                id: None,
                vcpus: None,
                memory_mb: None,
                root_gb: None,
                ephemeral_gb: None,
            },
            vm_state: vm_state.into(),
            task_state: task.map(str::to_owned),
            power_state: None,
            created_at: None,
            launched_at: None,
            deleted_at: None,
            terminated_at: None,
            step: crate::event::Step::Other,
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

    fn resource(kind: ResourceKind, step: ResourceStep, status: &str, project: Option<&str>) -> Box<Resource> {
        Box::new(Resource {
            project: project.map(|p| ProjectId::parse(p).unwrap()),
            size: Some(1),
            status: status.into(),
            ..Resource::named(kind, InstanceId::parse("v-1").unwrap(), step)
        })
    }

    fn volume_in(status: &str) -> Status {
        volume_status(&resource(ResourceKind::Volume, ResourceStep::Other, status, Some("p-1")))
    }

    #[test]
    fn an_attached_volume_is_active_and_a_detached_one_available() {
        assert_eq!(volume_in("in-use"), Status::Active);
        assert_eq!(volume_in("available"), Status::Available);
    }

    #[test]
    fn the_transitions_the_reference_maps_are_in_progress() {
        for state in ["creating", "attaching", "detaching", "maintenance", "reserved", "downloading", "deleting"] {
            assert_eq!(volume_in(state), Status::InProgress, "{state}");
        }
    }

    #[test]
    fn cinders_other_transitions_are_in_progress_rather_than_failed() {
        for state in
            ["extending", "uploading", "retyping", "backing-up", "restoring-backup", "awaiting-transfer", "managing"]
        {
            assert_eq!(volume_in(state), Status::InProgress, "{state}");
        }
    }

    #[test]
    fn cinder_errors_and_states_nobody_maps_are_failed() {
        for state in [
            "error",
            "error_deleting",
            "error_extending",
            "error_restoring",
            "error_backing-up",
            "error_managing",
            "",
            "?",
        ] {
            assert_eq!(volume_in(state), Status::Failed, "{state:?}");
        }
    }

    #[test]
    fn every_volume_status_is_one_rails_accepts_for_a_volume() {
        // VIZ `app/models/volume.rb`: `IN_PROGRESS FAILED ACTIVE AVAILABLE`.
        for state in ["in-use", "available", "creating", "extending", "error", "?"] {
            let status = volume_in(state).as_str();
            assert!(["IN_PROGRESS", "FAILED", "ACTIVE", "AVAILABLE"].contains(&status), "{state}: {status}");
        }
    }

    #[test]
    fn a_volume_step_sets_its_device_status_and_a_delete_removes_its_device() {
        let id = InstanceId::parse("v-1").unwrap();
        let at = ts("2025-01-01T00:00:00Z");
        let cases = [
            (ResourceStep::Created, "available", Status::Available),
            (ResourceStep::Changed, "in-use", Status::Active),
            (ResourceStep::Other, "in-use", Status::Active),
            (ResourceStep::Other, "detaching", Status::InProgress),
        ];
        for (step, state, status) in cases {
            let n = notification(Event::Resource(resource(ResourceKind::Volume, step, state, Some("p-1"))));
            assert_eq!(
                plan(&n, &settings()),
                [Update::DeviceStatus { instance: id.clone(), status, at }],
                "{step:?} {state}"
            );
        }
        let deleted = notification(Event::Resource(resource(
            ResourceKind::Volume,
            ResourceStep::Deleted,
            "deleting",
            Some("p-1"),
        )));
        assert_eq!(plan(&deleted, &settings()), [Update::RemoveDevice { instance: id }]);
    }

    #[test]
    fn snapshots_floating_ips_and_images_change_nothing_in_concertim() {
        for kind in [ResourceKind::Snapshot, ResourceKind::FloatingIp, ResourceKind::Image] {
            for step in [ResourceStep::Created, ResourceStep::Associated, ResourceStep::Deleted] {
                let n = notification(Event::Resource(resource(kind, step, "available", Some("p-1"))));
                assert!(plan(&n, &settings()).is_empty(), "{kind} {step:?}");
            }
        }
    }

    #[test]
    fn a_volume_of_a_project_the_filter_refuses_changes_nothing_and_one_without_a_project_is_shown() {
        let mut filtered = settings();
        filtered.projects.exclude.push(ProjectId::parse("p-1").unwrap());
        let refused = notification(Event::Resource(resource(
            ResourceKind::Volume,
            ResourceStep::Created,
            "available",
            Some("p-1"),
        )));
        assert!(plan(&refused, &filtered).is_empty());
        let deleted = notification(Event::Resource(resource(
            ResourceKind::Volume,
            ResourceStep::Deleted,
            "deleting",
            Some("p-1"),
        )));
        assert!(plan(&deleted, &filtered).is_empty());
        // The filter can only judge a project it is told.
        let unknown =
            notification(Event::Resource(resource(ResourceKind::Volume, ResourceStep::Created, "available", None)));
        assert_eq!(plan(&unknown, &filtered).len(), 1);
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
            deleted_at: None,
            counter: "gauge".into(),
        };
        let n = notification(Event::Usage {
            samples: vec![sample("cpu_util", 42), sample("vcpus", 2), sample("memory", 512)],
            unattributed: 0,
        });
        // Gauge samples are no usage: the metric is pushed, and no team figure changes.
        let updates = plan(&n, &settings());
        assert_eq!(updates.len(), 1, "{updates:?}");
        let Update::PushMetrics { metrics, .. } = &updates[0] else { panic!("{updates:?}") };
        assert_eq!((metrics[0].name.as_str(), metrics[0].value, metrics[0].ttl), ("cpu_load", 42.0, 3600));
        let mut metered = settings();
        metered.billing.meters.insert(
            "vcpus".into(),
            crate::config::MeterRule {
                unit: crate::event::Unit::parse("u").unwrap(),
                factor: crate::config::Factor::ONE,
                counter: crate::config::Counter::Delta,
                resource: crate::event::ResourceKind::Instance,
            },
        );
        let updates = plan(&n, &metered);
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
