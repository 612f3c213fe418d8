//! `[billing]` and `[projects]`: where billing goes, plans, meters, which projects are billed.

use crate::timeline::{Charge, Kind, Period, Policy, TimeUnit};
use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::event::{PlanName, ProjectId, ResourceKind, Unit};

use super::*;

/// Which billing application receives the plans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The embedded ledger (memory, or the `--ledger` file).
    #[default]
    Ledger,
    /// KillBill, as configured in `[killbill]`.
    Killbill,
    /// HostBill, as configured in `[hostbill]`.
    Hostbill,
}

/// Billing rules: plans and meters.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSettings {
    /// Where billing goes: `ledger` (the default) or `killbill`.
    #[serde(default)]
    pub backend: BackendKind,
    /// The plan of flavors not listed in `plans`.
    pub default_plan: PlanName,
    /// Flavor name → plan.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanName>,
    /// Ceilometer meter name → billing unit and factor. Meters not listed are not billed.
    #[serde(default)]
    pub meters: BTreeMap<String, MeterRule>,
    /// The largest amount one usage record may carry (in its unit). A sample whose amount is
    /// above it, negative, or dated far from its notification is invalid and dead-lettered
    /// with the reason, never billed (nor credited).
    #[serde(default = "default_max_record_amount")]
    pub max_record_amount: Decimal,
    /// How instance time is billed: units, periods, settlement, the state policy.
    #[serde(default)]
    pub time: TimeSettings,
    /// The plans and policies of the other resource kinds: volumes, snapshots, floating IPs,
    /// images, network traffic.
    #[serde(default)]
    pub resources: ResourceSettings,
    /// The billing API's `create_order` refuses when the account's remaining credits (credits
    /// minus the upcoming invoice) are at or below this, as the Python service did.
    #[serde(default = "default_credit_threshold")]
    pub credit_threshold: Decimal,
}

fn default_credit_threshold() -> Decimal {
    Decimal::from(25)
}

/// The other resource kinds (`[billing.resources]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSettings {
    /// The plan of volumes whose type is not in `volume_types`.
    #[serde(default = "default_volume_plan")]
    pub volume_plan: PlanName,
    /// Volume type (as Cinder sends it: the type's name, or its id in older releases) → plan.
    #[serde(default)]
    pub volume_types: BTreeMap<String, PlanName>,
    /// The plan of volume snapshots.
    #[serde(default = "default_snapshot_plan")]
    pub snapshot_plan: PlanName,
    /// The plan of floating IPs.
    #[serde(default = "default_floating_ip_plan")]
    pub floating_ip_plan: PlanName,
    /// When a floating IP is billed: `allocated` (the default: from its creation to its
    /// deletion) or `associated` (only while it is associated with a port).
    #[serde(default)]
    pub floating_ip_billed: FloatingIpBilled,
    /// The plan of images a project owns (public images are billed to nobody).
    #[serde(default = "default_image_plan")]
    pub image_plan: PlanName,
    /// The plan of network interfaces, whose traffic is billed.
    #[serde(default = "default_network_plan")]
    pub network_plan: PlanName,
    /// Bill Ceilometer's `network.outgoing.bytes` in GiB as `openstack-network-egress-gib`
    /// (unless `[billing.meters]` lists the meter itself).
    #[serde(default = "yes")]
    pub network_egress: bool,
    /// Bill `network.incoming.bytes` in GiB as `openstack-network-ingress-gib` (off by default).
    #[serde(default)]
    pub network_ingress: bool,
}

impl Default for ResourceSettings {
    fn default() -> Self {
        Self {
            volume_plan: default_volume_plan(),
            volume_types: BTreeMap::new(),
            snapshot_plan: default_snapshot_plan(),
            floating_ip_plan: default_floating_ip_plan(),
            floating_ip_billed: FloatingIpBilled::default(),
            image_plan: default_image_plan(),
            network_plan: default_network_plan(),
            network_egress: true,
            network_ingress: false,
        }
    }
}

/// When a floating IP is billed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FloatingIpBilled {
    /// From its creation to its deletion: the address is held either way.
    #[default]
    Allocated,
    /// Only while associated with a port.
    Associated,
}

fn yes() -> bool {
    true
}

fn plan_name(name: &str) -> PlanName {
    // The built-in names are valid plan names.
    PlanName::parse(name).unwrap_or_else(|_| unreachable!("{name} is a valid plan name"))
}

fn default_volume_plan() -> PlanName {
    plan_name("openstack-volume-monthly")
}

fn default_snapshot_plan() -> PlanName {
    plan_name("openstack-snapshot-monthly")
}

fn default_floating_ip_plan() -> PlanName {
    plan_name("openstack-floating-ip-monthly")
}

fn default_image_plan() -> PlanName {
    plan_name("openstack-image-monthly")
}

fn default_network_plan() -> PlanName {
    plan_name("openstack-network-monthly")
}

/// The built-in traffic meters: (meter, unit, the `[billing.resources]` switch).
const TRAFFIC_METERS: [(&str, &str); 2] = [
    ("network.outgoing.bytes", "openstack-network-egress-gib"),
    ("network.incoming.bytes", "openstack-network-ingress-gib"),
];

/// How instance time is billed (`[billing.time]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TimeSettings {
    /// The unit amounts are posted in: `seconds` (the default: KillBill's rounding of a month's
    /// total up to a whole unit then costs at most one second), `minutes` or `hours`.
    #[serde(default)]
    pub unit: TimeUnit,
    /// Usage is posted per instance and aligned UTC period: `hour` (the default) or `day`.
    #[serde(default)]
    pub period: Period,
    /// A period is settled this long after its end (or the instance's end), so that late and
    /// reordered notifications of it are in first.
    #[serde(default = "default_grace_s")]
    pub grace_s: u64,
    /// How often `run` looks for periods to settle.
    #[serde(default = "default_settle_every_s")]
    pub settle_every_s: u64,
    /// What stopped and suspended instances are charged for: `all` (the default), `disk` or `none`.
    #[serde(default)]
    pub stopped: Charge,
    /// What soft-deleted instances are charged for until their reclaim: `all` (the default) or `none`.
    #[serde(default)]
    pub soft_deleted: Charge,
}

impl Default for TimeSettings {
    fn default() -> Self {
        Self {
            unit: TimeUnit::default(),
            period: Period::default(),
            grace_s: default_grace_s(),
            settle_every_s: default_settle_every_s(),
            stopped: Charge::default(),
            soft_deleted: Charge::default(),
        }
    }
}

impl TimeSettings {
    /// The price policy of the held states.
    pub fn policy(&self) -> Policy {
        Policy { stopped: self.stopped, soft_deleted: self.soft_deleted }
    }

    /// The unit name of a kind (`openstack-vcpu-seconds` …).
    pub fn unit_name(&self, kind: Kind) -> String {
        kind.unit_name(self.unit)
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        if self.settle_every_s == 0 {
            return Err("billing.time.settle_every_s must be at least 1".into());
        }
        if self.soft_deleted == Charge::Disk {
            return Err(
                "billing.time.soft_deleted is \"all\" or \"none\" (a soft-deleted instance keeps its disk either way)"
                    .into(),
            );
        }
        Ok(())
    }
}

fn default_grace_s() -> u64 {
    900
}

fn default_settle_every_s() -> u64 {
    60
}

pub(super) fn default_max_record_amount() -> Decimal {
    Decimal::from(1_000_000_000u64)
}

impl BillingSettings {
    /// The plan for a flavor name: its entry in `plans`, or the default plan.
    pub fn plan_for(&self, flavor: Option<&str>) -> &PlanName {
        flavor.and_then(|name| self.plans.get(name)).unwrap_or(&self.default_plan)
    }

    /// The plan of a resource of a kind: an instance's from its flavor, a volume's from its
    /// type, the others' from `[billing.resources]`.
    pub fn plan_of(&self, kind: ResourceKind, type_name: Option<&str>) -> &PlanName {
        let r = &self.resources;
        match kind {
            ResourceKind::Instance => self.plan_for(type_name),
            ResourceKind::Volume => type_name.and_then(|t| r.volume_types.get(t)).unwrap_or(&r.volume_plan),
            ResourceKind::Snapshot => &r.snapshot_plan,
            ResourceKind::FloatingIp => &r.floating_ip_plan,
            ResourceKind::Image => &r.image_plan,
            ResourceKind::NetworkInterface => &r.network_plan,
        }
    }

    /// Every plan a subscription can be on: the instance plans (`default_plan`, `plans`), the
    /// volume plans (`volume_plan`, `volume_types`), the snapshot, floating IP and image plans,
    /// and the network plan when a meter measures network interfaces. Each once, in that order.
    pub fn billed_plans(&self) -> Vec<&PlanName> {
        let r = &self.resources;
        let traffic = self.meters.values().any(|m| m.resource == ResourceKind::NetworkInterface);
        let all = std::iter::once(&self.default_plan)
            .chain(self.plans.values())
            .chain(std::iter::once(&r.volume_plan))
            .chain(r.volume_types.values())
            .chain([&r.snapshot_plan, &r.floating_ip_plan, &r.image_plan])
            .chain(traffic.then_some(&r.network_plan));
        let mut plans: Vec<&PlanName> = Vec::new();
        for plan in all {
            if !plans.contains(&plan) {
                plans.push(plan);
            }
        }
        plans
    }

    /// Every unit usage can be posted in: the time units of every resource kind in the
    /// `[billing.time]` unit (`openstack-vcpu-seconds`, `openstack-volume-gib-seconds` …), then
    /// each metered meter's unit. Each once, in that order.
    pub fn billed_units(&self) -> Vec<String> {
        let time = ResourceKind::ALL.into_iter().flat_map(Kind::billing).map(|kind| self.time.unit_name(kind));
        let mut units: Vec<String> = Vec::new();
        for unit in time.chain(self.meters.values().map(|m| m.unit.to_string())) {
            if !units.contains(&unit) {
                units.push(unit);
            }
        }
        units
    }

    /// The price policy of a kind's held states: instances follow `[billing.time]`; a floating
    /// IP is "stopped" while not associated, charged or not as `floating_ip_billed` says.
    pub fn policy_of(&self, kind: ResourceKind) -> Policy {
        match kind {
            ResourceKind::FloatingIp => Policy {
                stopped: match self.resources.floating_ip_billed {
                    FloatingIpBilled::Allocated => Charge::All,
                    FloatingIpBilled::Associated => Charge::None,
                },
                soft_deleted: Charge::All,
            },
            ResourceKind::Instance => self.time.policy(),
            _ => Policy::default(),
        }
    }

    /// Adds the traffic meters `[billing.resources]` switches on, unless `[billing.meters]`
    /// lists them already: cumulative bytes, billed in GiB (2^30 bytes) on the interface.
    pub(super) fn add_traffic_meters(&mut self) {
        let on = [self.resources.network_egress, self.resources.network_ingress];
        for ((meter, unit), on) in TRAFFIC_METERS.into_iter().zip(on) {
            if on && !self.meters.contains_key(meter) {
                let rule = MeterRule {
                    unit: Unit::parse(unit).unwrap_or_else(|_| unreachable!("{unit} is a valid unit")),
                    factor: "1/1073741824".parse().unwrap_or(Factor::ONE),
                    counter: Counter::Cumulative,
                    resource: ResourceKind::NetworkInterface,
                };
                self.meters.insert(meter.to_owned(), rule);
            }
        }
    }
}

/// How one Ceilometer meter is billed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeterRule {
    /// The billing unit (KillBill `unitType`).
    pub unit: Unit,
    /// amount = volume × factor.
    pub factor: Factor,
    /// What the meter counts: `delta` (each sample is new usage: summed) or `cumulative` (a
    /// running total: billed as its increases, a restart from zero counted from zero). Samples
    /// of any other `counter_type` (a gauge is a level, not usage) are not billed.
    pub counter: Counter,
    /// The kind of resource the meter measures: `instance` (the default) or
    /// `network_interface` (a traffic meter's resource is the instance's interface).
    #[serde(default)]
    pub resource: ResourceKind,
}

/// A metered meter's counter type, as Ceilometer's `counter_type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Counter {
    /// Each sample is usage since the previous one.
    Delta,
    /// Each sample is a running total.
    Cumulative,
}

impl Counter {
    /// Ceilometer's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Counter::Delta => "delta",
            Counter::Cumulative => "cumulative",
        }
    }
}

/// Which projects are billed. Keystone and Nova notifications carry project ids, not names, so
/// the filter is by id.
// FIXME(billing): filtering by project name (only `CM_*` projects, as Concertim names them)
// needs a Keystone lookup per new project id; until then such a deployment lists the ids.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFilter {
    /// When non-empty, only these projects are billed.
    #[serde(default)]
    pub include: Vec<ProjectId>,
    /// Never billed, even when included.
    #[serde(default)]
    pub exclude: Vec<ProjectId>,
    /// When set, a project is billed only while this user holds this role on it (the Python
    /// service's Concertim-managed projects: user `concertim`, role `watcher`), as Keystone's
    /// `identity.role_assignment.created`/`deleted` notifications say.
    #[serde(default)]
    pub managed_by: Option<ManagedBy>,
    /// When non-empty, a project is billed when its name matches one of these patterns (`*`
    /// matches any run of characters: `CM_*`, as Concertim names its projects). Names come
    /// from the notifications whose caller acted in the project (`_context_project_name`).
    #[serde(default)]
    pub include_names: Vec<String>,
}

/// The role assignment that admits a project (`[projects.managed_by]`): the user and the role
/// by id, or by name (resolved once through Keystone when `run` starts, which needs the
/// `[keystone]` section).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedBy {
    /// The user's Keystone id (`openstack user show concertim -f value -c id`).
    #[serde(default)]
    pub user: Option<crate::event::UserId>,
    /// The role's Keystone id (`openstack role show watcher -f value -c id`).
    #[serde(default)]
    pub role: Option<crate::event::RoleId>,
    /// The user's name, instead of its id.
    #[serde(default)]
    pub user_name: Option<String>,
    /// The id of the user's domain, with `user_name`.
    #[serde(default = "default_domain")]
    pub user_domain: String,
    /// The role's name, instead of its id.
    #[serde(default)]
    pub role_name: Option<String>,
}

fn default_domain() -> String {
    "default".to_owned()
}

impl Default for ManagedBy {
    fn default() -> Self {
        Self { user: None, role: None, user_name: None, user_domain: default_domain(), role_name: None }
    }
}

impl ManagedBy {
    /// The assignment of these ids.
    pub fn ids(user: crate::event::UserId, role: crate::event::RoleId) -> Self {
        Self { user: Some(user), role: Some(role), ..Self::default() }
    }

    /// Whether a role assignment of `user` and `role` is this one (never, before names are
    /// resolved).
    pub fn is(&self, user: Option<&crate::event::UserId>, role: Option<&crate::event::RoleId>) -> bool {
        self.user.is_some() && self.role.is_some() && user == self.user.as_ref() && role == self.role.as_ref()
    }

    /// Whether a name is still to be resolved through Keystone.
    pub fn needs_names(&self) -> bool {
        self.user.is_none() || self.role.is_none()
    }

    fn validate(&self) -> Result<(), String> {
        match (&self.user, &self.user_name) {
            (Some(_), Some(_)) => return Err("projects.managed_by: give user or user_name, not both".into()),
            (None, None) => return Err("projects.managed_by needs user (an id) or user_name".into()),
            _ => {}
        }
        match (&self.role, &self.role_name) {
            (Some(_), Some(_)) => Err("projects.managed_by: give role or role_name, not both".into()),
            (None, None) => Err("projects.managed_by needs role (an id) or role_name".into()),
            _ => Ok(()),
        }
    }
}

impl ProjectFilter {
    pub(super) fn validate(&self) -> Result<(), String> {
        if let Some(p) = self.include.iter().find(|p| self.exclude.contains(p)) {
            return Err(format!("project {p} is both in projects.include and projects.exclude"));
        }
        if let Some(m) = &self.managed_by {
            m.validate()?;
        }
        if let Some(p) = self.include_names.iter().find(|p| p.is_empty() || p.chars().all(|c| c == '*')) {
            return Err(format!(
                "projects.include_names has {p:?}, which matches every name (or none): leave include_names empty to bill every project"
            ));
        }
        Ok(())
    }

    /// Whether projects are billed only once admitted (`managed_by`, `include_names`).
    pub fn managed_scope(&self) -> bool {
        self.managed_by.is_some() || !self.include_names.is_empty()
    }

    /// Whether a project named `name` matches `include_names`.
    pub fn name_admits(&self, name: &str) -> bool {
        self.include_names.iter().any(|pattern| glob(pattern, name))
    }

    /// Whether events of this project are billed.
    pub fn admits(&self, project: &ProjectId) -> bool {
        !self.exclude.contains(project) && (self.include.is_empty() || self.include.contains(project))
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (none included)
/// and every other character itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The meters Ceilometer emits per instance, which the default configuration bills.
pub const INSTANCE_METERS: [&str; 6] = ["vcpus", "memory", "disk.root.size", "disk.ephemeral.size", "instance", "cpu"];

/// Whether Ceilometer emits a meter by this name: one of its instance meters, or one of its
/// meter families (`network.*`, `volume.*`, …).
pub(super) fn is_ceilometer_meter(name: &str) -> bool {
    const OTHERS: [&str; 6] = ["bandwidth", "ip.floating", "memory.usage", "memory.resident", "cpu_l3_cache", "port"];
    const FAMILIES: [&str; 13] = [
        "disk.",
        "network.",
        "volume.",
        "snapshot.",
        "image.",
        "storage.",
        "memory.",
        "hardware.",
        "ip.",
        "port.",
        "switch.",
        "compute.node.",
        "backup.",
    ];
    INSTANCE_METERS.contains(&name) || OTHERS.contains(&name) || FAMILIES.iter().any(|f| name.starts_with(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_matches_any_run_of_characters_and_everything_else_itself() {
        for (pattern, text, matches) in [
            ("CM_*", "CM_physics", true),
            ("CM_*", "CM_", true),
            ("CM_*", "cm_physics", false),
            ("CM_*", "XCM_physics", false),
            ("*_proj", "CM_alice_proj", true),
            ("CM_*_proj", "CM_alice_proj", true),
            ("CM_*_proj", "CM_alice", false),
            ("a*b*c", "abbc", true),
            ("a*a", "a", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob(pattern, text), matches, "{pattern} ~ {text}");
        }
    }
}
