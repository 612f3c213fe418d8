//! Instance timelines: lifecycle facts → the seconds each flavor was held, per billing period.
//!
//! Pure: no I/O, no clock. Every notification about an instance adds [`Fact`]s to a set; the
//! [`Timeline`] is a function of that set alone, so arrival order and duplicates never change a
//! bill. Nova resets `launched_at` on resize, revert, rebuild, rescue and unshelve, so every later
//! launch starts a new *segment* (a new flavor from then on), never a new life: segment *i* runs
//! from launch *i* to the next launch, a change of state, or the end. An instance with no launch
//! anywhere (a failed build) has no segment and is never billed.
//!
//! Times are whole seconds since the Unix epoch (Nova's microseconds are dropped at the boundary,
//! so a lifetime is exact to the second: the error of each boundary telescopes away).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::event::ResourceKind;

/// What a flavor holds, as the billing units see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Size {
    /// The flavor name (selects the plan).
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u64,
    /// RAM in MiB.
    pub memory_mb: u64,
    /// Root plus ephemeral disk, in GiB (a volume's or a snapshot's size).
    pub disk_gb: u64,
    /// A size in bytes (an image's); absent from the fact's key when zero, so the facts of
    /// kinds without it keep their keys.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Who reported a launch: Nova's own notification outranks the metadata of a Ceilometer sample,
/// which carries the flavor name but sizes only for the meters in its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A Nova instance notification (either format).
    Nova,
    /// A notification-derived Ceilometer sample's metadata.
    Sample,
}

/// A state an instance is held in between launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Held {
    /// Running (`power_on.end`, `resume.end`, `restore.end`, and every launch).
    Running,
    /// Powered off on its host (`power_off.end`, `shelve.end`).
    Stopped,
    /// Suspended on its host (`suspend.end`, `pause.end`).
    Suspended,
    /// Shelved and offloaded: no host holds it (`shelve_offload.end`).
    Offloaded,
    /// Soft-deleted, restorable until reclaimed (`soft_delete.end`).
    SoftDeleted,
}

/// One fact about an instance. The set of facts is the instance's whole billing history.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "fact", rename_all = "snake_case")]
pub enum Fact {
    /// A `launched_at`, with the flavor of the message that reported it and that message's time.
    Launch {
        /// The payload's `launched_at`.
        at: i64,
        /// Who reported it.
        source: Source,
        /// When the reporting message was sent (several messages report one `launched_at`; the
        /// earliest one's flavor wins, since `finish_resize.start` already carries the new
        /// flavor with the old `launched_at`).
        seen: i64,
        /// The flavor that message carried.
        size: Size,
    },
    /// The instance entered a state at `at` (the `.end` notification's time).
    State {
        /// When.
        at: i64,
        /// The state.
        held: Held,
    },
    /// The end: `terminated_at` (Nova frees the host there, and its own usage API bills to it),
    /// else `deleted_at`.
    End {
        /// When.
        at: i64,
        /// `terminated_at` (true) or `deleted_at` (false).
        terminated: bool,
    },
    /// A Nova usage audit (`exists`): the window and what Nova says was held in it.
    Audit {
        /// `audit_period_beginning`.
        begin: i64,
        /// `audit_period_ending`.
        end: i64,
        /// The `launched_at` it reports.
        launched_at: i64,
        /// The `terminated_at` it reports, when set.
        terminated_at: Option<i64>,
        /// The flavor it reports.
        size: Size,
    },
    /// A reading of a cumulative meter (a running total, e.g. bytes sent): billed as its
    /// increases per period.
    Reading {
        /// The meter.
        meter: String,
        /// The sample's time.
        at: i64,
        /// The running total, as decimal text (normalised, so one reading is one fact).
        total: String,
    },
}

impl Fact {
    /// The fact as the store keys it: its canonical JSON (fields in declaration order), so the
    /// same fact from two messages is one row.
    pub fn key(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// From when this fact can change what the timeline bills (a new launch changes the segment
    /// it falls in from its own time on; an audit changes nothing).
    pub fn effective(&self) -> i64 {
        match self {
            Fact::Launch { at, .. } | Fact::State { at, .. } | Fact::End { at, .. } => *at,
            Fact::Audit { end, .. } => *end,
            Fact::Reading { at, .. } => *at,
        }
    }
}

/// What an instance in a held state is charged for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Charge {
    /// Every unit, as when running.
    #[default]
    All,
    /// Only its disk.
    Disk,
    /// Nothing.
    None,
}

/// What each state is charged for (the price policy; [`Held::Running`] is always charged for
/// everything, [`Held::Offloaded`] for nothing: no host holds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Stopped and suspended instances.
    #[serde(default)]
    pub stopped: Charge,
    /// Soft-deleted instances, until their reclaim (`delete.end`) or restore.
    #[serde(default)]
    pub soft_deleted: Charge,
}

impl Policy {
    fn charge(&self, held: Held) -> Charge {
        match held {
            Held::Running => Charge::All,
            Held::Stopped | Held::Suspended => self.stopped,
            Held::Offloaded => Charge::None,
            Held::SoftDeleted => self.soft_deleted,
        }
    }
}

/// A stretch of time with one flavor in one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Start (inclusive).
    pub from: i64,
    /// End (exclusive); `None` while the instance runs.
    pub to: Option<i64>,
    /// The flavor held.
    pub size: Size,
    /// The state it was in.
    pub held: Held,
}

/// An instance's billable history: a pure function of its facts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Timeline {
    /// The segments, in time order, never overlapping.
    pub segments: Vec<Segment>,
    /// The first launch: billing starts here (the subscription's start).
    pub first_launch: Option<i64>,
    /// The end, when known.
    pub end: Option<i64>,
}

impl Timeline {
    /// Builds the timeline of a fact set (any order, any duplicates). `closed_at` is the end of
    /// the owning project, when it was deleted: nothing is billed after it.
    pub fn of<'a>(facts: impl IntoIterator<Item = &'a Fact>, closed_at: Option<i64>) -> Self {
        // For each launched_at, the flavor of the best report: Nova before samples, then the
        // earliest message, then the smallest flavor (any total order makes it deterministic).
        let mut launches: BTreeMap<i64, (Source, i64, &Size)> = BTreeMap::new();
        let mut states: Vec<(i64, Held)> = Vec::new();
        let (mut terminated, mut deleted): (Option<i64>, Option<i64>) = (None, None);
        for fact in facts {
            match fact {
                Fact::Launch { at, source, seen, size } => {
                    let candidate = (*source, *seen, size);
                    launches.entry(*at).and_modify(|best| *best = (*best).min(candidate)).or_insert(candidate);
                }
                Fact::State { at, held } => states.push((*at, *held)),
                Fact::End { at, terminated: true } => terminated = Some(terminated.map_or(*at, |t| t.min(*at))),
                Fact::End { at, terminated: false } => deleted = Some(deleted.map_or(*at, |t| t.min(*at))),
                Fact::Audit { .. } | Fact::Reading { .. } => {}
            }
        }
        let end = [terminated.or(deleted), closed_at].into_iter().flatten().min();
        let Some(first) = launches.keys().next().copied() else {
            return Timeline { segments: Vec::new(), first_launch: None, end };
        };
        if end.is_some_and(|end| end <= first) {
            // Ended before it ever ran (or its project ended first): nothing is billable.
            return Timeline { segments: Vec::new(), first_launch: Some(first), end };
        }
        states.sort_unstable();
        states.dedup();
        // Change points in time order; at one instant a launch comes first (it sets the flavor
        // and means running) and states after it, in their own order.
        enum Change<'s> {
            Launch(&'s Size),
            State(Held),
        }
        let mut changes: Vec<(i64, u8, Change<'_>)> = launches
            .iter()
            .map(|(at, (_, _, size))| (*at, 0, Change::Launch(size)))
            .chain(states.iter().filter(|(at, _)| *at >= first).map(|(at, held)| (*at, 1, Change::State(*held))))
            .collect();
        changes.sort_by_key(|(at, order, _)| (*at, *order));
        let mut segments: Vec<Segment> = Vec::new();
        let mut current: Option<(i64, &Size, Held)> = None;
        for (at, _, change) in changes {
            if end.is_some_and(|end| at >= end) {
                break;
            }
            let (size, held) = match (change, current) {
                (Change::Launch(size), _) => (size, Held::Running),
                (Change::State(held), Some((_, size, _))) => (size, held),
                (Change::State(_), None) => continue,
            };
            if let Some((from, s, h)) = current {
                if s == size && h == held {
                    continue;
                }
                push(&mut segments, from, Some(at), s, h);
            }
            current = Some((at, size, held));
        }
        if let Some((from, size, held)) = current {
            push(&mut segments, from, end, size, held);
        }
        Timeline { segments, first_launch: Some(first), end }
    }

    /// The integer quantities held over `[from, to)` under a policy.
    pub fn held(&self, from: i64, to: i64, policy: &Policy) -> Held4 {
        let mut total = Held4::default();
        for s in &self.segments {
            let start = s.from.max(from);
            let stop = s.to.unwrap_or(i64::MAX).min(to);
            if stop <= start {
                continue;
            }
            let seconds = i128::from(stop - start);
            match policy.charge(s.held) {
                Charge::All => {
                    total.instance_s += seconds;
                    total.vcpu_s += seconds * i128::from(s.size.vcpus);
                    total.memory_mb_s += seconds * i128::from(s.size.memory_mb);
                    total.disk_gb_s += seconds * i128::from(s.size.disk_gb);
                    total.byte_s += seconds * i128::from(s.size.bytes);
                }
                Charge::Disk => total.disk_gb_s += seconds * i128::from(s.size.disk_gb),
                Charge::None => {}
            }
        }
        total
    }

    /// The flavor changes after the first launch: (when, new flavor name), in time order.
    pub fn flavor_changes(&self) -> Vec<(i64, &str)> {
        let mut changes = Vec::new();
        let mut last: Option<&str> = None;
        for s in &self.segments {
            if last.is_some_and(|l| l != s.size.name) {
                changes.push((s.from, s.size.name.as_str()));
            }
            last = Some(&s.size.name);
        }
        changes
    }

    /// The first flavor held.
    pub fn first_size(&self) -> Option<&Size> {
        self.segments.first().map(|s| &s.size)
    }
}

fn push(segments: &mut Vec<Segment>, from: i64, to: Option<i64>, size: &Size, held: Held) {
    if to.is_some_and(|to| to <= from) {
        return;
    }
    segments.push(Segment { from, to, size: size.clone(), held });
}

/// Exact quantities held over a window: seconds, and seconds × each size (integers: no drift).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held4 {
    /// Instance-seconds.
    pub instance_s: i128,
    /// vCPU-seconds.
    pub vcpu_s: i128,
    /// MiB-seconds of RAM.
    pub memory_mb_s: i128,
    /// GiB-seconds of disk.
    pub disk_gb_s: i128,
    /// Byte-seconds (images).
    pub byte_s: i128,
}

impl Held4 {
    /// Whether nothing was held.
    pub fn is_empty(&self) -> bool {
        *self == Held4::default()
    }
}

/// The length of a billing period, aligned to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// Aligned hours.
    #[default]
    Hour,
    /// Aligned UTC days.
    Day,
}

impl Period {
    /// The period's length in seconds.
    pub fn seconds(self) -> i64 {
        match self {
            Period::Hour => 3_600,
            Period::Day => 86_400,
        }
    }

    /// The start of the period holding `t`.
    pub fn start_of(self, t: i64) -> i64 {
        t - t.rem_euclid(self.seconds())
    }
}

/// The unit of time amounts are posted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    /// Seconds: amounts are integers for instances, vCPUs and disks, so KillBill's rounding of
    /// each month's total up to a whole unit costs at most one second.
    #[default]
    Seconds,
    /// Minutes.
    Minutes,
    /// Hours.
    Hours,
}

impl TimeUnit {
    /// Seconds in one unit.
    pub fn seconds(self) -> i64 {
        match self {
            TimeUnit::Seconds => 1,
            TimeUnit::Minutes => 60,
            TimeUnit::Hours => 3_600,
        }
    }

    /// The suffix of the unit names (`openstack-vcpu-<suffix>`).
    pub fn suffix(self) -> &'static str {
        match self {
            TimeUnit::Seconds => "seconds",
            TimeUnit::Minutes => "minutes",
            TimeUnit::Hours => "hours",
        }
    }
}

/// The time units resources are billed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The instance itself.
    Instance,
    /// Its vCPUs.
    Vcpu,
    /// Its RAM, in GiB.
    MemoryGib,
    /// Its root and ephemeral disk, in GiB.
    DiskGib,
    /// A volume's GiB.
    VolumeGib,
    /// A snapshot's GiB.
    SnapshotGib,
    /// A floating IP.
    FloatingIp,
    /// An image's GiB (of 2^30 bytes).
    ImageGib,
}

impl Kind {
    /// The instance kinds, in the order records are posted.
    pub const ALL: [Kind; 4] = [Kind::Instance, Kind::Vcpu, Kind::MemoryGib, Kind::DiskGib];

    /// The unit name in a time unit: `openstack-instance-seconds`, `openstack-volume-gib-hours` ….
    pub fn unit_name(self, unit: TimeUnit) -> String {
        let kind = match self {
            Kind::Instance => "instance",
            Kind::Vcpu => "vcpu",
            Kind::MemoryGib => "memory-gib",
            Kind::DiskGib => "disk-gib",
            Kind::VolumeGib => "volume-gib",
            Kind::SnapshotGib => "snapshot-gib",
            Kind::FloatingIp => "floating-ip",
            Kind::ImageGib => "image-gib",
        };
        format!("openstack-{kind}-{}", unit.suffix())
    }

    /// The time units a resource kind is billed in, in the order records are posted (none for a
    /// network interface, which its traffic meters measure).
    pub fn billing(resource: ResourceKind) -> Vec<Kind> {
        Kind::of(resource, &Held4::default()).into_iter().map(|(kind, _, _)| kind).collect()
    }

    /// The time units a resource kind is billed in, each with the quantity it counts and the
    /// divisor from that quantity to one unit-second.
    fn of(resource: ResourceKind, held: &Held4) -> Vec<(Kind, i128, i128)> {
        match resource {
            ResourceKind::Instance => vec![
                (Kind::Instance, held.instance_s, 1),
                (Kind::Vcpu, held.vcpu_s, 1),
                (Kind::MemoryGib, held.memory_mb_s, 1024),
                (Kind::DiskGib, held.disk_gb_s, 1),
            ],
            ResourceKind::Volume => vec![(Kind::VolumeGib, held.disk_gb_s, 1)],
            ResourceKind::Snapshot => vec![(Kind::SnapshotGib, held.disk_gb_s, 1)],
            ResourceKind::FloatingIp => vec![(Kind::FloatingIp, held.instance_s, 1)],
            ResourceKind::Image => vec![(Kind::ImageGib, held.byte_s, 1 << 30)],
            // Measured by its traffic meters only: no time unit.
            ResourceKind::NetworkInterface => Vec::new(),
        }
    }
}

/// Decimal places of a posted amount (KillBill keeps usage as `decimal(18,9)`).
pub const SCALE: u32 = 9;

/// The amounts of one window of a resource of this kind, one rounding per record:
/// `(kind, amount)` for every unit held (zero amounts are left out). `None` when an amount does
/// not fit a decimal.
pub fn amounts(held: &Held4, unit: TimeUnit, resource: ResourceKind) -> Option<Vec<(Kind, Decimal)>> {
    let per = i128::from(unit.seconds());
    let mut out = Vec::with_capacity(4);
    for (kind, value, divisor) in Kind::of(resource, held) {
        if value == 0 {
            continue;
        }
        let amount = Decimal::try_from_i128_with_scale(value, 0)
            .ok()?
            .checked_div(Decimal::try_from_i128_with_scale(per * divisor, 0).ok()?)?
            .round_dp(SCALE)
            .normalize();
        out.push((kind, amount));
    }
    Some(out)
}

/// The increase of each cumulative meter over `[from, to)`: for every reading in the window, its
/// total minus the previous reading's (or the whole total when it is lower: the counter started
/// again from zero, as after a reboot). The first reading ever is the baseline and adds nothing.
/// Two readings at one instant count once (the larger). Pure, so any order gives the same sums.
pub fn increases(facts: &[Fact], from: i64, to: i64) -> BTreeMap<String, Decimal> {
    let mut readings: BTreeMap<&str, BTreeMap<i64, Decimal>> = BTreeMap::new();
    for fact in facts {
        if let Fact::Reading { meter, at, total } = fact {
            let Ok(total) = total.parse::<Decimal>() else { continue };
            let slot = readings.entry(meter.as_str()).or_default().entry(*at).or_insert(total);
            *slot = (*slot).max(total);
        }
    }
    let mut out = BTreeMap::new();
    for (meter, series) in readings {
        let mut previous: Option<Decimal> = None;
        let mut sum = Decimal::ZERO;
        for (at, total) in series {
            if (from..to).contains(&at) {
                if let Some(before) = previous {
                    sum += if total >= before { total - before } else { total };
                }
            }
            previous = Some(total);
        }
        if !sum.is_zero() {
            out.insert(meter.to_owned(), sum);
        }
    }
    out
}

/// FNV-1a, 64 bits: a stable hash for derived ids (the standard library's hasher may change
/// between releases, and an id must not).
pub fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// How an audit compares with the timeline: `None` when they agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditMismatch {
    /// The audit window's start.
    pub begin: i64,
    /// The audit window's end.
    pub end: i64,
    /// Seconds × vCPUs Nova's audit says were held in the window.
    pub audited_vcpu_s: i128,
    /// Seconds × vCPUs the timeline bills for the same window, all states charged.
    pub timeline_vcpu_s: i128,
}

/// Checks every audit of the fact set against the timeline. Nova's audit only knows the
/// current segment (`launched_at` moves on resize), so it is compared with the timeline's
/// instance-seconds from that `launched_at` on, ignoring what the policy charges.
pub fn audit(facts: &[Fact], timeline: &Timeline) -> Vec<AuditMismatch> {
    let mut out = Vec::new();
    for fact in facts {
        let Fact::Audit { begin, end, launched_at, terminated_at, size } = fact else { continue };
        let from = (*begin).max(*launched_at);
        let to = terminated_at.map_or(*end, |t| t.min(*end));
        let audited = i128::from((to - from).max(0)) * i128::from(size.vcpus);
        let ours = timeline
            .segments
            .iter()
            .filter(|s| s.held != Held::Offloaded)
            .map(|s| {
                let start = s.from.max(from);
                let stop = s.to.unwrap_or(i64::MAX).min(to);
                i128::from((stop - start).max(0)) * i128::from(s.size.vcpus)
            })
            .sum::<i128>();
        if audited != ours {
            out.push(AuditMismatch { begin: *begin, end: *end, audited_vcpu_s: audited, timeline_vcpu_s: ours });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds of a UTC time of 2025-03-03 given as "HH:MM:SS".
    pub(crate) fn at(hms: &str) -> i64 {
        let parts: Vec<i64> = hms.split(':').map(|p| p.parse().unwrap()).collect();
        1_740_960_000 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    }

    fn size(name: &str, vcpus: u64, memory_mb: u64, disk_gb: u64) -> Size {
        Size { name: name.into(), vcpus, memory_mb, disk_gb, bytes: 0 }
    }

    fn launch(t: &str, s: &Size) -> Fact {
        Fact::Launch { at: at(t), source: Source::Nova, seen: at(t), size: s.clone() }
    }

    fn end(t: &str) -> Fact {
        Fact::End { at: at(t), terminated: true }
    }

    fn held_over(facts: &[Fact], from: &str, to: &str, policy: &Policy) -> Held4 {
        Timeline::of(facts, None).held(at(from), at(to), policy)
    }

    #[test]
    fn the_base_time_is_midnight_utc() {
        assert_eq!(at("00:00:00") % 86_400, 0);
    }

    #[test]
    fn a_resize_mid_period_bills_each_flavor_for_its_own_seconds() {
        // launched 09:00:41 (1 vCPU), resized 09:26:30 (2 vCPUs), terminated 09:40:01:
        // 25 min 49 s = 1549 s on one vCPU, 13 min 31 s = 811 s on two: 1549 + 1622 = 3171 vCPU-s.
        let small = size("m1.small", 1, 2048, 20);
        let large = size("m1.large", 2, 4096, 40);
        let facts = [launch("09:00:41", &small), launch("09:26:30", &large), end("09:40:01")];
        let held = held_over(&facts, "09:00:00", "10:00:00", &Policy::default());
        assert_eq!(held.instance_s, 2360);
        assert_eq!(held.vcpu_s, 3171);
        assert_eq!(held.memory_mb_s, 1549 * 2048 + 811 * 4096);
        assert_eq!(held.disk_gb_s, 1549 * 20 + 811 * 40);
    }

    #[test]
    fn a_revert_bills_the_old_flavor_again_from_its_launch() {
        let small = size("m1.small", 1, 1024, 10);
        let large = size("m1.large", 4, 1024, 10);
        // 10:00 small, 10:10 resized to large, 10:20 reverted (a new launched_at, old flavor).
        let facts = [launch("10:00:00", &small), launch("10:10:00", &large), launch("10:20:00", &small)];
        let held = held_over(&facts, "10:00:00", "11:00:00", &Policy::default());
        assert_eq!(held.vcpu_s, 600 + 600 * 4 + 2400);
        let timeline = Timeline::of(&facts, None);
        assert_eq!(timeline.flavor_changes(), [(at("10:10:00"), "m1.large"), (at("10:20:00"), "m1.small")]);
    }

    #[test]
    fn the_earliest_report_of_a_launch_gives_its_flavor() {
        // finish_resize.start carries the new flavor with the old launched_at; the create.end
        // that first reported that launched_at is earlier, and wins.
        let small = size("m1.small", 1, 1024, 10);
        let large = size("m1.large", 4, 1024, 10);
        let early = Fact::Launch { at: at("10:00:00"), source: Source::Nova, seen: at("10:00:01"), size: small };
        let stale = Fact::Launch { at: at("10:00:00"), source: Source::Nova, seen: at("10:30:00"), size: large };
        for facts in [[early.clone(), stale.clone()], [stale, early]] {
            assert_eq!(Timeline::of(&facts, None).first_size().unwrap().name, "m1.small");
        }
    }

    #[test]
    fn shelve_offload_stops_billing_until_the_unshelve_launch() {
        let s = size("m1.small", 2, 1024, 10);
        let facts = [
            launch("10:00:00", &s),
            Fact::State { at: at("10:15:00"), held: Held::Stopped },
            Fact::State { at: at("10:20:00"), held: Held::Offloaded },
            launch("10:50:00", &s),
            end("11:00:00"),
        ];
        let held = held_over(&facts, "10:00:00", "11:00:00", &Policy::default());
        assert_eq!(held.instance_s, 20 * 60 + 10 * 60);
    }

    #[test]
    fn the_stopped_policy_bills_disk_only_or_nothing() {
        let s = size("m1.small", 2, 1024, 10);
        let facts = [
            launch("10:00:00", &s),
            Fact::State { at: at("10:20:00"), held: Held::Stopped },
            Fact::State { at: at("10:40:00"), held: Held::Running },
            end("11:00:00"),
        ];
        let all = held_over(&facts, "10:00:00", "11:00:00", &Policy::default());
        assert_eq!((all.instance_s, all.disk_gb_s), (3600, 36_000));
        let disk = held_over(&facts, "10:00:00", "11:00:00", &Policy { stopped: Charge::Disk, ..Policy::default() });
        assert_eq!((disk.instance_s, disk.vcpu_s, disk.disk_gb_s), (2400, 4800, 36_000));
        let none = held_over(&facts, "10:00:00", "11:00:00", &Policy { stopped: Charge::None, ..Policy::default() });
        assert_eq!((none.instance_s, none.disk_gb_s), (2400, 24_000));
    }

    #[test]
    fn a_soft_deleted_instance_is_billed_until_its_reclaim_unless_the_policy_says_not() {
        let s = size("m1.small", 1, 1024, 10);
        let facts =
            [launch("10:00:00", &s), Fact::State { at: at("10:30:00"), held: Held::SoftDeleted }, end("10:45:00")];
        assert_eq!(held_over(&facts, "10:00:00", "11:00:00", &Policy::default()).instance_s, 45 * 60);
        let not = Policy { soft_deleted: Charge::None, ..Policy::default() };
        assert_eq!(held_over(&facts, "10:00:00", "11:00:00", &not).instance_s, 30 * 60);
    }

    #[test]
    fn a_failed_build_has_no_segment() {
        let facts = [end("10:00:05")];
        let timeline = Timeline::of(&facts, None);
        assert!(timeline.segments.is_empty());
        assert_eq!(timeline.first_launch, None);
    }

    #[test]
    fn terminated_at_wins_over_an_earlier_deleted_at_and_the_project_end_caps_both() {
        let s = size("m1.small", 1, 1024, 10);
        let facts = [
            launch("10:00:00", &s),
            Fact::End { at: at("10:40:00"), terminated: false },
            Fact::End { at: at("10:30:00"), terminated: true },
        ];
        assert_eq!(Timeline::of(&facts, None).end, Some(at("10:30:00")));
        assert_eq!(Timeline::of(&facts, Some(at("10:10:00"))).end, Some(at("10:10:00")));
        assert_eq!(Timeline::of(&facts, Some(at("09:00:00"))).segments, []);
    }

    #[test]
    fn a_running_instance_is_billed_to_any_cut() {
        let s = size("m1.small", 1, 1024, 10);
        let timeline = Timeline::of(&[launch("10:00:00", &s)], None);
        assert_eq!(timeline.held(at("10:00:00"), at("10:12:34"), &Policy::default()).instance_s, 754);
    }

    #[test]
    fn amounts_are_rounded_once_per_record_in_the_chosen_unit() {
        let held =
            Held4 { instance_s: 2360, vcpu_s: 3171, memory_mb_s: 1549 * 2048 + 811 * 4096, disk_gb_s: 1, byte_s: 0 };
        let seconds = amounts(&held, TimeUnit::Seconds, ResourceKind::Instance).unwrap();
        assert_eq!(seconds[2], (Kind::MemoryGib, Decimal::new(6342, 0)));
        let hours = amounts(&held, TimeUnit::Hours, ResourceKind::Instance).unwrap();
        assert_eq!(hours[0], (Kind::Instance, "0.655555556".parse().unwrap()));
        assert_eq!(Kind::MemoryGib.unit_name(TimeUnit::Minutes), "openstack-memory-gib-minutes");
    }

    #[test]
    fn an_audit_that_disagrees_is_reported_with_both_figures() {
        let s = size("m1.small", 2, 1024, 10);
        let audit_fact = |terminated_at| Fact::Audit {
            begin: at("10:00:00"),
            end: at("11:00:00"),
            launched_at: at("09:00:00"),
            terminated_at,
            size: s.clone(),
        };
        let agreeing = [launch("09:00:00", &s), end("10:30:00"), audit_fact(Some(at("10:30:00")))];
        assert_eq!(audit(&agreeing, &Timeline::of(&agreeing, None)), []);
        let disagreeing = [launch("09:00:00", &s), end("10:30:00"), audit_fact(None)];
        let found = audit(&disagreeing, &Timeline::of(&disagreeing, None));
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].audited_vcpu_s, found[0].timeline_vcpu_s), (7200, 3600));
    }

    #[test]
    fn a_cumulative_counter_bills_its_increases_per_window_and_a_restart_from_zero() {
        let reading = |t: &str, total: u32| Fact::Reading { meter: "net".into(), at: at(t), total: total.to_string() };
        // 100 at 09:55 is the baseline; +50 by 10:05, then a reboot (20 from zero), then +10.
        let facts =
            [reading("10:05:00", 150), reading("09:55:00", 100), reading("10:30:00", 20), reading("11:10:00", 30)];
        assert_eq!(increases(&facts, at("10:00:00"), at("11:00:00"))["net"], Decimal::from(70));
        assert_eq!(increases(&facts, at("11:00:00"), at("12:00:00"))["net"], Decimal::from(10));
        assert!(increases(&facts, at("09:00:00"), at("10:00:00")).is_empty(), "the first reading is a baseline");
        let mut shuffled = facts.to_vec();
        shuffled.reverse();
        shuffled.push(facts[1].clone());
        assert_eq!(increases(&shuffled, at("10:00:00"), at("11:00:00"))["net"], Decimal::from(70));
    }

    #[test]
    fn periods_align_to_the_hour_and_the_utc_day() {
        assert_eq!(Period::Hour.start_of(at("09:26:30")), at("09:00:00"));
        assert_eq!(Period::Day.start_of(at("09:26:30")), at("00:00:00"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// One instance life drawn at random: launches (resizes, reverts, unshelves), states,
        /// audits, an optional end. Its true quantities are computed here by walking each second,
        /// independently of [`Timeline`].
        #[derive(Debug, Clone)]
        struct Life {
            facts: Vec<Fact>,
        }

        fn sizes() -> Vec<Size> {
            vec![size("a", 1, 512, 1), size("b", 2, 3000, 20), size("c", 8, 16384, 80)]
        }

        fn life() -> impl Strategy<Value = Life> {
            let launches = prop::collection::vec((0i64..7200, 0usize..3, 0i64..50), 1..5);
            let states = prop::collection::vec((0i64..7200, 0usize..5), 0..6);
            let ends = prop::option::of((0i64..8000, any::<bool>()));
            (launches, states, ends).prop_map(|(launches, states, end)| {
                let base = at("10:00:00");
                let mut facts = Vec::new();
                for (t, s, lag) in launches {
                    facts.push(Fact::Launch {
                        at: base + t,
                        source: Source::Nova,
                        seen: base + t + lag,
                        size: sizes()[s].clone(),
                    });
                }
                let helds = [Held::Running, Held::Stopped, Held::Suspended, Held::Offloaded, Held::SoftDeleted];
                for (t, h) in states {
                    facts.push(Fact::State { at: base + t, held: helds[h] });
                }
                if let Some((t, terminated)) = end {
                    facts.push(Fact::End { at: base + t, terminated });
                }
                Life { facts }
            })
        }

        /// The truth, second by second, from the facts' plain meaning.
        fn truth(facts: &[Fact], from: i64, to: i64, policy: &Policy) -> Held4 {
            let launch_of = |t: i64| {
                facts
                    .iter()
                    .filter_map(|f| match f {
                        Fact::Launch { at, seen, size, .. } if *at <= t => Some((*at, *seen, size)),
                        _ => None,
                    })
                    .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(a.2)))
            };
            let terminated = facts.iter().filter_map(|f| match f {
                Fact::End { at, terminated: true } => Some(*at),
                _ => None,
            });
            let deleted = facts.iter().filter_map(|f| match f {
                Fact::End { at, terminated: false } => Some(*at),
                _ => None,
            });
            let end = terminated.min().or(deleted.min());
            let mut total = Held4::default();
            for t in from..to {
                if end.is_some_and(|e| t >= e) {
                    break;
                }
                let Some((launched, _, size)) = launch_of(t) else { continue };
                // The latest state at or before t, unless a launch came at or after it.
                let state = facts
                    .iter()
                    .filter_map(|f| match f {
                        Fact::State { at, held } if *at <= t && *at >= launched => Some((*at, *held)),
                        _ => None,
                    })
                    .max()
                    .map_or(Held::Running, |(_, h)| h);
                match policy.charge(state) {
                    Charge::All => {
                        total.instance_s += 1;
                        total.vcpu_s += i128::from(size.vcpus);
                        total.memory_mb_s += i128::from(size.memory_mb);
                        total.disk_gb_s += i128::from(size.disk_gb);
                    }
                    Charge::Disk => total.disk_gb_s += i128::from(size.disk_gb),
                    Charge::None => {}
                }
            }
            total
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

            #[test]
            fn any_order_and_duplication_bills_the_seconds_held(
                life in life(),
                order in any::<u64>(),
                copies in prop::collection::vec(0usize..8, 0..6),
                stopped in 0usize..3,
            ) {
                let charges = [Charge::All, Charge::Disk, Charge::None];
                let policy = Policy { stopped: charges[stopped], soft_deleted: Charge::All };
                let mut shuffled = life.facts.clone();
                for c in copies {
                    shuffled.push(life.facts[c % life.facts.len()].clone());
                }
                let mut rng = order;
                for i in (1..shuffled.len()).rev() {
                    rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    shuffled.swap(i, (rng >> 33) as usize % (i + 1));
                }
                let base = at("10:00:00");
                let timeline = Timeline::of(&shuffled, None);
                prop_assert_eq!(&timeline, &Timeline::of(&life.facts, None));
                for (from, to) in [(base, base + 3600), (base + 3600, base + 7200), (base + 7200, base + 9000)] {
                    prop_assert_eq!(timeline.held(from, to, &policy), truth(&life.facts, from, to, &policy));
                }
            }
        }
    }
}
