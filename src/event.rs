//! The domain events and the value types they are made of.
//!
//! Everything after decoding speaks these types: ids are newtypes that can only be built through
//! `parse`, so an empty or oversized id never reaches a billing backend, and no `serde_json::Value`
//! crosses this boundary. This module knows nothing about wire formats (that is `notification`)
//! nor about billing rules (that is `plan`).

use std::{fmt, str::FromStr};

use rust_decimal::Decimal;
use time::{format_description::well_known::Rfc3339, OffsetDateTime, UtcOffset};

/// Why a value could not become one of the domain types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The value was empty where an id is required.
    #[error("{kind} is empty")]
    Empty {
        /// Which kind of value.
        kind: &'static str,
    },
    /// The value was longer than the billing applications accept as a key.
    #[error("{kind} is {len} characters long; at most {max} are accepted")]
    TooLong {
        /// Which kind of value.
        kind: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value contained a character that has no place in an OpenStack id.
    #[error("{kind} {value:?} contains {ch:?}, which is not allowed in an id")]
    BadChar {
        /// Which kind of value.
        kind: &'static str,
        /// The value (already bounded in length).
        value: String,
        /// The offending character.
        ch: char,
    },
}

/// Longest key accepted: KillBill's externalKey limit (`EXTERNAL_KEY_LIMIT_EXCEEDED` above 255).
const MAX_KEY_LEN: usize = 255;

/// Checks an OpenStack identifier: non-empty, at most 255 characters, printable ASCII without
/// spaces, quotes, slashes or other characters that would need escaping in a URL path segment.
fn check_key(kind: &'static str, value: &str) -> Result<(), ValueError> {
    if value.is_empty() {
        return Err(ValueError::Empty { kind });
    }
    if value.len() > MAX_KEY_LEN {
        return Err(ValueError::TooLong { kind, len: value.len(), max: MAX_KEY_LEN });
    }
    if let Some(ch) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))) {
        return Err(ValueError::BadChar { kind, value: value.to_owned(), ch });
    }
    Ok(())
}

macro_rules! key_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an identifier.
            ///
            /// # Errors
            /// When the value is empty, longer than 255 characters, or holds a character
            /// outside `[A-Za-z0-9._:@-]`.
            pub fn parse(value: impl Into<String>) -> Result<Self, ValueError> {
                let value = value.into();
                check_key($kind, &value)?;
                Ok(Self(value))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

key_newtype!(
    /// A Keystone project id: the billing account's external key.
    ProjectId,
    "project id"
);
key_newtype!(
    /// A Nova instance uuid (or, for usage, the id of the billed resource): the subscription's
    /// external key.
    InstanceId,
    "instance id"
);
key_newtype!(
    /// A Keystone user id.
    UserId,
    "user id"
);
key_newtype!(
    /// A Keystone role id.
    RoleId,
    "role id"
);
key_newtype!(
    /// The oslo `message_id` of a notification: the root of every derived idempotency key.
    MessageId,
    "message id"
);
impl MessageId {
    /// The id the settlement's own steps are sent under (they answer no message).
    pub fn settlement() -> Self {
        Self("settlement".to_owned())
    }
}

key_newtype!(
    /// A Heat stack id.
    StackId,
    "stack id"
);
key_newtype!(
    /// A billing plan name (KillBill `planName`, or the HostBill product it maps to).
    PlanName,
    "plan name"
);
key_newtype!(
    /// A billing unit (KillBill `unitType`, HostBill metered variable).
    Unit,
    "unit"
);

/// A point in time, always UTC, printed as RFC 3339.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

/// Why a timestamp could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a timestamp in any form OpenStack sends")]
pub struct TimestampError {
    /// The text that was rejected (bounded).
    pub value: String,
}

impl Timestamp {
    /// 1970-01-01T00:00:00Z.
    pub const UNIX_EPOCH: Timestamp = Timestamp(OffsetDateTime::UNIX_EPOCH);

    /// Reads every timestamp form OpenStack services emit, all UTC:
    /// `2025-08-18 10:38:25.282831` (oslo envelope, naive with a space), `2012-10-29T13:42:11Z`
    /// (Nova versioned), `2017-07-06T16:58:34.000000` (naive with a `T`),
    /// `2025-08-18T10:38:25.282120+0000` (Keystone CADF), `…+00:00` (Ceilometer, Cinder) and
    /// `2017-07-06 16:58:55+00:00`. Fractions of any length up to nanoseconds are kept.
    ///
    /// The empty string and `"None"` (legacy Nova's "unset") are not timestamps: use
    /// [`Timestamp::parse_optional`] where a field may be unset.
    ///
    /// # Errors
    /// When the text is none of the forms above.
    pub fn parse(text: &str) -> Result<Self, TimestampError> {
        parse_timestamp(text.trim()).ok_or_else(|| TimestampError { value: text.chars().take(64).collect() })
    }

    /// Like [`Timestamp::parse`], but the empty string and `"None"` mean unset.
    ///
    /// # Errors
    /// When the text is neither unset nor a timestamp.
    pub fn parse_optional(text: &str) -> Result<Option<Self>, TimestampError> {
        match text.trim() {
            "" | "None" | "null" => Ok(None),
            other => Self::parse(other).map(Some),
        }
    }

    /// Builds a timestamp from seconds since the Unix epoch.
    ///
    /// # Errors
    /// When the value is outside the representable range.
    pub fn from_unix(seconds: i64) -> Result<Self, TimestampError> {
        OffsetDateTime::from_unix_timestamp(seconds)
            .map(Self)
            .map_err(|_| TimestampError { value: seconds.to_string() })
    }

    /// The current time, to the second (UTC).
    pub fn now() -> Self {
        let now = OffsetDateTime::now_utc();
        Self(now.replace_nanosecond(0).unwrap_or(now))
    }

    /// Seconds since the Unix epoch.
    pub fn unix(&self) -> i64 {
        self.0.unix_timestamp()
    }

    /// The underlying date-time (UTC).
    pub fn as_offset(&self) -> OffsetDateTime {
        self.0
    }

    /// RFC 3339 text, e.g. `2024-05-01T10:00:00Z` or `2024-05-01T10:00:00.5Z`.
    pub fn to_rfc3339(&self) -> String {
        // Formatting a UTC date-time within years 0..=9999 as RFC 3339 cannot fail; parse()
        // only accepts four-digit years.
        self.0.format(&Rfc3339).unwrap_or_else(|_| self.0.to_string())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Hand-written because the forms differ in separator, fraction length and offset spelling, and
/// one pass over the bytes is both faster and stricter than trying several format strings.
fn parse_timestamp(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(part.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')))
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b' ' | b'T') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let year = i32::try_from(num(0..4)?).ok()?;
    let month = time::Month::try_from(u8::try_from(num(5..7)?).ok()?).ok()?;
    let day = u8::try_from(num(8..10)?).ok()?;
    let hour = u8::try_from(num(11..13)?).ok()?;
    let minute = u8::try_from(num(14..16)?).ok()?;
    let second = u8::try_from(num(17..19)?).ok()?;
    let mut i = 19;
    let mut nanos = 0u32;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &b[start..i];
        if digits.is_empty() || digits.len() > 9 {
            return None;
        }
        nanos = digits.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')) * 10u32.pow(9 - digits.len() as u32);
    }
    let offset = match &b[i..] {
        [] | [b'Z'] | [b'z'] => UtcOffset::UTC,
        [sign @ (b'+' | b'-'), h1, h2, rest @ ..] => {
            let (m1, m2) = match rest {
                [b':', m1, m2] | [m1, m2] => (*m1, *m2),
                [] => (b'0', b'0'),
                _ => return None,
            };
            let digits = [*h1, *h2, m1, m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let hours = i8::try_from((h1 - b'0') * 10 + (h2 - b'0')).ok()?;
            let minutes = i8::try_from((m1 - b'0') * 10 + (m2 - b'0')).ok()?;
            let sign = if *sign == b'-' { -1 } else { 1 };
            UtcOffset::from_hms(sign * hours, sign * minutes, 0).ok()?
        }
        _ => return None,
    };
    let date = time::Date::from_calendar_date(year, month, day).ok()?;
    let clock = time::Time::from_hms_nano(hour, minute, second, nanos).ok()?;
    Some(Timestamp(time::PrimitiveDateTime::new(date, clock).assume_offset(offset).to_offset(UtcOffset::UTC)))
}

/// A flavor as notifications describe it. The flavor *name* selects the billing plan; the sizes
/// are kept for display and custom fields.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Flavor {
    /// Flavor name (`instance_type` in legacy Nova, `flavor.name` in versioned Nova,
    /// `flavor_name` in Ceilometer metadata).
    pub name: String,
    /// The API flavor id, when the notification carries it.
    pub id: Option<String>,
    /// Virtual CPUs, when known.
    pub vcpus: Option<u32>,
    /// RAM in MiB, when known.
    pub memory_mb: Option<u64>,
    /// Root disk in GiB, when known.
    pub root_gb: Option<u64>,
    /// Ephemeral disk in GiB, when known.
    pub ephemeral_gb: Option<u64>,
}

/// What a Nova instance notification says about the instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Instance {
    /// The instance uuid.
    pub id: InstanceId,
    /// The owning project (`tenant_id`).
    pub project: ProjectId,
    /// The owning user, when present.
    pub user: Option<UserId>,
    /// The display name (may be empty).
    pub display_name: String,
    /// The flavor the instance has in this notification (the new one after a resize).
    pub flavor: Flavor,
    /// Nova's vm state (`active`, `stopped`, `deleted`, …).
    pub vm_state: String,
    /// Nova's task state (`state_description` in legacy, `task_state` in versioned), if any.
    pub task_state: Option<String>,
    /// The power state (versioned only), if any.
    pub power_state: Option<String>,
    /// When the instance was created.
    pub created_at: Option<Timestamp>,
    /// When the instance first ran: the start of billing.
    pub launched_at: Option<Timestamp>,
    /// When the instance was deleted: the end of billing.
    pub deleted_at: Option<Timestamp>,
    /// When the instance was terminated (legacy Nova sets this with or instead of `deleted_at`).
    pub terminated_at: Option<Timestamp>,
    /// What this notification says about the instance's billable life.
    pub step: Step,
}

/// What one instance notification means for its timeline (see `timeline`): Nova resets
/// `launched_at` on every step that [`Step::Launched`] names, and reports the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `create.end`, `finish_resize.end`/`resize_finish.end`, `resize.revert.end`/
    /// `resize_revert.end`, `rebuild.end`, `rescue.end`, `unshelve.end`: a (new) `launched_at`
    /// with the flavor held from then on.
    Launched,
    /// `delete.start`, `delete.end`: the current `launched_at` and flavor, and the end.
    Deleting,
    /// `exists`: Nova's usage audit of a window.
    Audit {
        /// `audit_period_beginning`.
        begin: Timestamp,
        /// `audit_period_ending`.
        end: Timestamp,
    },
    /// The instance entered a state that the price policy may charge differently.
    Entered(crate::timeline::Held),
    /// Any other step: nothing about its billable time.
    Other,
}

/// What happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceAction {
    /// `create.end`: the instance exists and runs.
    Created,
    /// `finish_resize.end` / `resize_finish.end`: it has a new flavor.
    Resized,
    /// `delete.end` (and `soft_delete.end`): it is gone.
    Deleted,
    /// Any other completed lifecycle step (power, suspend, shelve, update, …): only its state
    /// changed.
    StateChanged,
}

/// One Ceilometer sample, reduced to what billing and metrics need.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Sample {
    /// Meter name (`counter_name`), e.g. `vcpus`, `memory`, `disk.root.size`.
    pub meter: String,
    /// Measured value.
    pub volume: Decimal,
    /// Ceilometer's unit for the volume (`vcpu`, `MB`, `GB`, …).
    pub unit: String,
    /// When the value was measured: the usage record's date.
    pub timestamp: Timestamp,
    /// The project that owns the resource.
    pub project: ProjectId,
    /// The measured resource (an instance uuid for compute meters).
    pub resource: InstanceId,
    /// Flavor of the instance, when the metadata says (enough to start its subscription).
    pub flavor_name: Option<String>,
    /// The instance's display name, when the metadata says.
    pub display_name: Option<String>,
    /// When the instance first ran, when the metadata says.
    pub launched_at: Option<Timestamp>,
    /// When the instance was created, when the metadata says.
    pub created_at: Option<Timestamp>,
    /// When the instance was deleted, when the metadata says.
    pub deleted_at: Option<Timestamp>,
    /// Ceilometer's `counter_type`: `gauge`, `cumulative` or `delta` (empty when absent).
    pub counter: String,
}

pub use crate::timeline::ResourceKind;

/// What a Cinder, Neutron or Glance notification says about one of its resources.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Resource {
    /// Which kind of resource.
    pub kind: ResourceKind,
    /// Its id (volume, snapshot, floating IP or image uuid).
    pub id: InstanceId,
    /// The owning project. Neutron's `floatingip.delete.end` names only the floating IP.
    pub project: Option<ProjectId>,
    /// The display name (may be empty).
    pub display_name: String,
    /// The volume type (name or id, as Cinder sends it): selects a volume's plan.
    pub type_name: Option<String>,
    /// The size: GiB for volumes and snapshots, bytes for images; none for floating IPs.
    pub size: Option<u64>,
    /// The service's status (`available`, `in-use`, `active`, `DOWN` …), as sent.
    pub status: String,
    /// When it started to be held: `launched_at` (volumes), else `created_at`.
    pub created_at: Option<Timestamp>,
    /// When it was deleted, when the payload says.
    pub deleted_at: Option<Timestamp>,
    /// For a floating IP: whether it is associated with a port.
    pub associated: Option<bool>,
    /// For an image: whether it is public (billed to nobody).
    pub public: bool,
    /// The instance a volume is attached to, when the payload says.
    pub attached_to: Option<InstanceId>,
    /// What this notification means for the resource's billable life.
    pub step: ResourceStep,
}

impl Resource {
    /// A resource known only by its kind, id and step: no project, size or times (what
    /// Neutron's `floatingip.delete.end` says); the other fields are filled in from there.
    pub fn named(kind: ResourceKind, id: InstanceId, step: ResourceStep) -> Self {
        Resource {
            kind,
            id,
            project: None,
            display_name: String::new(),
            type_name: None,
            size: None,
            status: String::new(),
            created_at: None,
            deleted_at: None,
            associated: None,
            public: false,
            attached_to: None,
            step,
        }
    }
}

/// What one resource notification means for its timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceStep {
    /// `volume.create.end`, `snapshot.create.end`, `floatingip.create.end`, `image.upload`,
    /// `image.activate`: held from its start, at its size.
    Created,
    /// `volume.resize.end` (an extend) or `volume.retype`: the new size or type from the
    /// notification's time on.
    Changed,
    /// `floatingip.update.end` (and the `associate`/`disassociate` names): associated or not
    /// from the notification's time on.
    Associated,
    /// `volume.delete.end`, `snapshot.delete.end`, `floatingip.delete.end`, `image.delete`.
    Deleted,
    /// Any other step (attach, detach, update): its status only.
    Other,
}

/// A Heat stack notification.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stack {
    /// The stack id (the uuid; older releases send an ARN, whose last segment is the uuid).
    pub id: StackId,
    /// The owning project.
    pub project: ProjectId,
    /// The stack name.
    pub name: String,
    /// Heat's state, e.g. `CREATE_COMPLETE`.
    pub state: String,
    /// Heat's reason text.
    pub reason: String,
}

/// A Keystone identity event other than a project change. A role assignment of the user and
/// role `projects.managed_by` names admits its project (or stops billing it); the others are
/// recognised and acted on by nothing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum IdentityChange {
    /// `identity.user.created|updated|deleted`.
    User {
        /// The user id.
        user: UserId,
        /// `created`, `updated` or `deleted`.
        operation: String,
    },
    /// `identity.role_assignment.created|deleted`.
    RoleAssignment {
        /// The project the role is granted on, when it is a project (not a domain) grant.
        project: Option<ProjectId>,
        /// The user it is granted to (none for a group's grant).
        user: Option<UserId>,
        /// The role granted.
        role: Option<RoleId>,
        /// `created` or `deleted`.
        operation: String,
    },
}

/// A decoded notification: what happened, in domain terms.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Event {
    /// `identity.project.created`.
    ProjectCreated {
        /// The new project.
        project: ProjectId,
    },
    /// `identity.project.updated` (also how Keystone reports a disabled project).
    ProjectUpdated {
        /// The project.
        project: ProjectId,
    },
    /// `identity.project.deleted`.
    ProjectDeleted {
        /// The deleted project.
        project: ProjectId,
    },
    /// A Keystone user or role-assignment change.
    Identity(IdentityChange),
    /// A completed Nova instance step, legacy or versioned.
    Instance {
        /// What happened.
        action: InstanceAction,
        /// The instance as the notification describes it.
        instance: Box<Instance>,
    },
    /// A Cinder volume or snapshot, Neutron floating IP or Glance image step.
    Resource(Box<Resource>),
    /// Ceilometer samples (`metering` or `telemetry.polling`).
    Usage {
        /// The samples, in notification order.
        samples: Vec<Sample>,
        /// Samples that name no project or no resource: nobody to bill, so only counted.
        unattributed: usize,
    },
    /// A Heat `orchestration.stack.*` notification.
    Stack(Stack),
    /// An event type nobody handles; acknowledged and counted.
    Ignored {
        /// Why it is ignored, e.g. `unhandled event type`.
        reason: &'static str,
    },
}

impl Event {
    /// The project this event belongs to, when it has one: the lane key and the filter subject.
    pub fn project(&self) -> Option<&ProjectId> {
        match self {
            Event::ProjectCreated { project }
            | Event::ProjectUpdated { project }
            | Event::ProjectDeleted { project } => Some(project),
            Event::Identity(IdentityChange::RoleAssignment { project, .. }) => project.as_ref(),
            Event::Identity(IdentityChange::User { .. }) | Event::Ignored { .. } => None,
            Event::Instance { instance, .. } => Some(&instance.project),
            Event::Resource(resource) => resource.project.as_ref(),
            Event::Usage { samples, .. } => samples.first().map(|s| &s.project),
            Event::Stack(stack) => Some(&stack.project),
        }
    }

    /// The instance (or other resource) this event is about, when it is about exactly one.
    pub fn instance(&self) -> Option<&InstanceId> {
        match self {
            Event::Instance { instance, .. } => Some(&instance.id),
            Event::Resource(resource) => Some(&resource.id),
            _ => None,
        }
    }
}

/// The envelope facts every notification carries, kept beside its event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Meta {
    /// oslo `message_id`.
    pub message_id: MessageId,
    /// oslo `event_type`, e.g. `compute.instance.create.end`.
    pub event_type: String,
    /// oslo `publisher_id`, e.g. `compute.host1`.
    pub publisher_id: String,
    /// oslo `priority`, upper case.
    pub priority: String,
    /// oslo `timestamp`: when the service emitted the notification.
    pub timestamp: Timestamp,
    /// The event's project's name, when the caller (`_context_project_id`) acted in that
    /// project and the context names it (`_context_project_name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_name: Option<String>,
}

/// A decoded notification: its envelope facts and its event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Notification {
    /// Envelope facts.
    pub meta: Meta,
    /// What happened.
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_openstack_timestamp_form_parses_to_the_same_instant() {
        let cases = [
            ("2025-08-18 10:38:25.282831", "oslo envelope"),
            ("2025-08-18T10:38:25.282831", "legacy nova naive T"),
            ("2025-08-18T10:38:25.282831Z", "zulu"),
            ("2025-08-18T10:38:25.282831+0000", "keystone cadf"),
            ("2025-08-18T10:38:25.282831+00:00", "ceilometer"),
            ("2025-08-18 10:38:25.282831+00:00", "legacy created_at"),
            ("2025-08-18T12:38:25.282831+02:00", "other offset"),
        ];
        let expected = Timestamp::parse("2025-08-18T10:38:25.282831Z").unwrap();
        for (text, case) in cases {
            assert_eq!(Timestamp::parse(text).unwrap(), expected, "case {case}: {text}");
        }
    }

    #[test]
    fn timestamps_without_fraction_and_with_short_fraction_parse() {
        assert_eq!(Timestamp::parse("2012-10-29T13:42:11Z").unwrap().to_rfc3339(), "2012-10-29T13:42:11Z");
        assert_eq!(Timestamp::parse("2025-08-18 10:38:25").unwrap().to_rfc3339(), "2025-08-18T10:38:25Z");
        assert_eq!(Timestamp::parse("2025-08-18 10:38:25.5").unwrap().to_rfc3339(), "2025-08-18T10:38:25.5Z");
    }

    #[test]
    fn empty_and_none_mean_unset() {
        assert_eq!(Timestamp::parse_optional("").unwrap(), None);
        assert_eq!(Timestamp::parse_optional("None").unwrap(), None);
        assert!(Timestamp::parse("").is_err());
    }

    #[test]
    fn malformed_timestamps_are_rejected() {
        for text in [
            "2025-13-01 00:00:00",
            "2025-02-30 00:00:00",
            "2025-08-18X10:38:25",
            "2025-08-18 10:38:25.",
            "2025-08-18 10:38:25+0",
            "2025-08-18 10:38:25 junk",
            "yesterday",
            "2025-08-18 10:38:25.1234567890",
        ] {
            assert!(Timestamp::parse(text).is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn ids_reject_empty_long_and_unsafe_values() {
        assert!(ProjectId::parse("").is_err());
        assert!(ProjectId::parse("a".repeat(256)).is_err());
        assert!(ProjectId::parse("a/b").is_err());
        assert!(ProjectId::parse("a b").is_err());
        assert!(ProjectId::parse("148f2f86b96440a1ba0934f837b2c77b").is_ok());
        assert!(InstanceId::parse("178b0921-8f85-4257-88b6-2e743b5a975c").is_ok());
        assert!(ProjectId::parse("openstack:1c2fc591-facb").is_ok());
    }
}
