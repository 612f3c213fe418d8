//! Carries out Concertim [`Update`]s: finds the device, rack or team, and changes it only when
//! it differs.
//!
//! Devices are found by `metadata.openstack_instance_id` (an instance's or a volume's id: the
//! original service keeps every device's OpenStack id there), racks by
//! `metadata.openstack_stack_id`, teams by `project_id`: each kind is listed once and cached, and
//! listed again on a miss (at most once per `relist_interval_ms`); there is no sync loop. An
//! update whose device, rack or team Concertim does not have is skipped and counted: Concertim
//! decides what it shows.
//!
//! Team refreshes are debounced per project: the first request schedules one refresh
//! `team_refresh_interval_ms` later, requests until then join it, so a burst of usage costs one
//! refresh per interval. The refresh reads the figures from the billing application then, so it
//! shows everything recorded before it runs: the team's cost, credits and billing period, each
//! of the team's devices' cost so far in the period (a device the figures do not name costs
//! nothing yet), and each of the team's racks' cost, the sum of the costs of the devices in it.
//! A cost is written only when it differs from what Concertim shows (as last listed, or as last
//! written).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::json;
use tracing::{debug, warn};

use super::{
    client::{Client, ConcertimError, Item, Team},
    Status, Update, Work,
};
use crate::{
    billing::{BillingError, Figures, ResourceCost},
    class::ErrorClass,
    config::{BackoffSettings, ConcertimSettings},
    event::{ProjectId, Timestamp},
    retry,
};

/// Why an update failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Concertim failed.
    #[error(transparent)]
    Concertim(#[from] ConcertimError),
    /// Reading the figures from the billing application failed.
    #[error("reading billing figures: {0}")]
    Billing(#[from] BillingError),
}

impl UpdateError {
    /// The failure class.
    pub fn class(&self) -> ErrorClass {
        match self {
            UpdateError::Concertim(e) => e.class(),
            UpdateError::Billing(e) => e.class(),
        }
    }
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Concertim was changed.
    Changed,
    /// Concertim already showed it.
    Unchanged,
    /// Concertim has no such device, rack or team (or the backend has no figures).
    NotFound,
    /// A newer status was applied already.
    Stale,
    /// Joined a pending team refresh.
    Scheduled,
    /// The team names another billing account already: left as it is, and said (a log line,
    /// [`crate::telemetry::TEAM_ACCOUNT_CONFLICTS`]).
    Conflict,
}

impl Done {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Done::Changed => "changed",
            Done::Unchanged => "unchanged",
            Done::NotFound => "not_found",
            Done::Stale => "stale",
            Done::Scheduled => "scheduled",
            Done::Conflict => "conflict",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Team,
    Device,
    Rack,
}

#[derive(Debug, Clone, Default)]
struct Entry {
    id: String,
    /// Status (devices, racks) or billing account (teams) as Concertim has it.
    value: Option<String>,
    /// The time of the last status we applied.
    at: Option<Timestamp>,
    /// A device's or rack's cost as Concertim has it.
    cost: Option<Decimal>,
    /// Where it belongs: a device's rack, a rack's team (record ids).
    parent: Option<String>,
}

#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<(u8, String), Entry>,
    listed: HashMap<u8, Instant>,
}

/// Applies Concertim work. Shared by the Concertim lanes.
#[derive(Debug)]
pub struct Worker<B> {
    client: Client,
    billing: Arc<B>,
    settings: ConcertimSettings,
    cache: Mutex<Cache>,
    relisting: [tokio::sync::Mutex<()>; 3],
    pending: Mutex<HashSet<ProjectId>>,
    refreshes: AtomicUsize,
}

impl<B: Figures + 'static> Worker<B> {
    /// A worker reading figures from `billing`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(settings: ConcertimSettings, billing: Arc<B>) -> Result<Self, ConcertimError> {
        Ok(Self {
            client: Client::new(settings.clone())?,
            billing,
            settings,
            cache: Mutex::new(Cache::default()),
            relisting: Default::default(),
            pending: Mutex::new(HashSet::new()),
            refreshes: AtomicUsize::new(0),
        })
    }

    /// The client (its login count is observable).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Team refreshes run so far.
    pub fn refreshes(&self) -> usize {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// Applies every update of `work`, in order.
    ///
    /// # Errors
    /// The first failing update, in words, with its error.
    pub async fn apply_all(self: &Arc<Self>, work: &Work) -> Result<Vec<Done>, (String, UpdateError)> {
        let mut done = Vec::with_capacity(work.updates.len());
        for update in &work.updates {
            let result = self.apply(update).await.map_err(|e| (update.describe(), e))?;
            metrics::counter!(crate::telemetry::CONCERTIM_UPDATES, "update" => update.kind(), "result" => result.as_str())
                .increment(1);
            done.push(result);
        }
        Ok(done)
    }

    /// Applies one update.
    ///
    /// # Errors
    /// When Concertim (or, for team figures, the billing application) fails.
    pub async fn apply(self: &Arc<Self>, update: &Update) -> Result<Done, UpdateError> {
        match update {
            Update::LinkTeam { project } => self.link_team(project).await,
            Update::RefreshTeam { project } => Ok(self.schedule_refresh(project)),
            Update::DeviceStatus { instance, status, at } => {
                self.set_status(Kind::Device, instance.as_str(), *status, *at).await
            }
            Update::RackStatus { stack, status, at } => self.set_status(Kind::Rack, stack.as_str(), *status, *at).await,
            Update::RemoveDevice { instance } => self.remove(Kind::Device, instance.as_str()).await,
            Update::RemoveRack { stack } => self.remove(Kind::Rack, stack.as_str()).await,
            Update::PushMetrics { instance, metrics } => {
                let Some(device) = self.find(Kind::Device, instance.as_str()).await? else {
                    return Ok(Done::NotFound);
                };
                let mut done = Done::Changed;
                for metric in metrics {
                    if !self.client.put_metric(&device.id, metric).await? {
                        done = Done::NotFound;
                    }
                }
                Ok(done)
            }
        }
    }

    async fn link_team(&self, project: &ProjectId) -> Result<Done, UpdateError> {
        let Some(team) = self.find(Kind::Team, project.as_str()).await? else { return Ok(Done::NotFound) };
        self.link(project, &team).await
    }

    /// Writes the project's account id on its team, unless the team shows it already or names
    /// another account: that one may be the account the team's invoices and credits are in (a
    /// previous billing service's), so it is kept, and the conflict is logged and counted for
    /// an operator to settle.
    async fn link(&self, project: &ProjectId, team: &Entry) -> Result<Done, UpdateError> {
        let Some(account) = self.billing.team_account(project).await? else { return Ok(Done::NotFound) };
        match team.value.as_deref().filter(|v| !v.is_empty()) {
            Some(current) if current == account => return Ok(Done::Unchanged),
            Some(current) => {
                metrics::counter!(crate::telemetry::TEAM_ACCOUNT_CONFLICTS).increment(1);
                tracing::warn!(
                    project = %project, team = %team.id, team_account = %current, billing_account = %account,
                    "the team names another billing account than the project's: left as it is; set the team's billing_acct_id by hand if the project's is the right one"
                );
                return Ok(Done::Conflict);
            }
            None => {}
        }
        let fields = json!({"billing_acct_id": account});
        Ok(self.change(Kind::Team, project.as_str(), team, fields, Some(account), None).await?)
    }

    /// Sets a device's or rack's status unless it shows it already or a newer one was applied.
    async fn set_status(&self, kind: Kind, key: &str, status: Status, at: Timestamp) -> Result<Done, UpdateError> {
        let Some(entry) = self.find(kind, key).await? else { return Ok(Done::NotFound) };
        if entry.at.is_some_and(|last| last > at) {
            return Ok(Done::Stale);
        }
        if entry.value.as_deref() == Some(status.as_str()) {
            self.store(kind, key, Entry { at: Some(at), ..entry });
            return Ok(Done::Unchanged);
        }
        let fields = json!({"status": status.as_str()});
        Ok(self.change(kind, key, &entry, fields, Some(status.as_str().to_owned()), Some(at)).await?)
    }

    /// PATCHes a record and keeps the cache in step; a record gone meanwhile is forgotten.
    async fn change(
        &self,
        kind: Kind,
        key: &str,
        entry: &Entry,
        fields: serde_json::Value,
        value: Option<String>,
        at: Option<Timestamp>,
    ) -> Result<Done, ConcertimError> {
        if !self.client.update(kind.name(), &entry.id, fields).await? {
            self.forget(kind, key);
            return Ok(Done::NotFound);
        }
        if value.is_some() || at.is_some() {
            let value = value.or_else(|| entry.value.clone());
            self.store(kind, key, Entry { value, at: at.or(entry.at), ..entry.clone() });
        }
        Ok(Done::Changed)
    }

    async fn remove(&self, kind: Kind, key: &str) -> Result<Done, UpdateError> {
        let Some(entry) = self.find(kind, key).await? else { return Ok(Done::NotFound) };
        self.client.delete(kind.name(), &entry.id).await?;
        self.forget(kind, key);
        Ok(Done::Changed)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self, kind: Kind, key: &str) -> Option<Entry> {
        self.lock_cache().entries.get(&(kind as u8, key.to_owned())).cloned()
    }

    fn store(&self, kind: Kind, key: &str, entry: Entry) {
        self.lock_cache().entries.insert((kind as u8, key.to_owned()), entry);
    }

    fn forget(&self, kind: Kind, key: &str) {
        self.lock_cache().entries.remove(&(kind as u8, key.to_owned()));
    }

    /// The cached record, or, on a miss, the record after listing the kind again (unless it
    /// was listed within the relist interval).
    async fn find(&self, kind: Kind, key: &str) -> Result<Option<Entry>, ConcertimError> {
        if let Some(entry) = self.cached(kind, key) {
            return Ok(Some(entry));
        }
        self.find_by(kind, |k, _| k == key).await.map(|found| found.map(|(_, entry)| entry))
    }

    /// The first cached record `wanted` picks (by key and entry), or, on a miss, the first after
    /// listing the kind again (unless it was listed within the relist interval).
    async fn find_by(
        &self,
        kind: Kind,
        wanted: impl Fn(&str, &Entry) -> bool,
    ) -> Result<Option<(String, Entry)>, ConcertimError> {
        let pick = || {
            let cache = self.lock_cache();
            cache
                .entries
                .iter()
                .find(|((k, key), entry)| *k == kind as u8 && wanted(key, entry))
                .map(|((_, key), entry)| (key.clone(), entry.clone()))
        };
        if let Some(found) = pick() {
            return Ok(Some(found));
        }
        // One listing per kind at a time; whoever waited finds the fresh list in the cache.
        let _one = self.relisting[kind as usize].lock().await;
        if let Some(found) = pick() {
            return Ok(Some(found));
        }
        let interval = Duration::from_millis(self.settings.relist_interval_ms);
        if self.lock_cache().listed.get(&(kind as u8)).is_some_and(|at| at.elapsed() < interval) {
            return Ok(None);
        }
        let listed: Vec<(String, Entry)> = match kind {
            Kind::Team => self.client.teams().await?.into_iter().filter_map(team_entry).collect(),
            Kind::Device => item_entries(self.client.devices().await?, "openstack_instance_id"),
            Kind::Rack => item_entries(self.client.racks().await?, "openstack_stack_id"),
        };
        debug!(kind = kind.name(), count = listed.len(), "listed Concertim records");
        {
            let mut cache = self.lock_cache();
            cache.entries.retain(|(k, _), _| *k != kind as u8);
            for (key, mut entry) in listed {
                // Keep the time of the last status applied: Concertim's answer has none.
                if let Some(old) = cache.entries.get(&(kind as u8, key.clone())) {
                    entry.at = old.at;
                }
                cache.entries.insert((kind as u8, key), entry);
            }
            cache.listed.insert(kind as u8, Instant::now());
        }
        Ok(pick())
    }

    /// Every cached record of a kind, as (key, entry).
    fn all_cached(&self, kind: Kind) -> Vec<(String, Entry)> {
        let cache = self.lock_cache();
        cache
            .entries
            .iter()
            .filter(|((k, _), _)| *k == kind as u8)
            .map(|((_, key), e)| (key.clone(), e.clone()))
            .collect()
    }

    /// Lists a kind unless it was listed once already (later misses list it again).
    async fn listed_once(&self, kind: Kind) -> Result<(), ConcertimError> {
        if !self.lock_cache().listed.contains_key(&(kind as u8)) {
            // A key no record has: a miss that lists the kind.
            self.find_by(kind, |_, _| false).await?;
        }
        Ok(())
    }

    /// Joins or schedules the project's next team refresh.
    fn schedule_refresh(self: &Arc<Self>, project: &ProjectId) -> Done {
        if !self.pending.lock().unwrap_or_else(PoisonError::into_inner).insert(project.clone()) {
            return Done::Scheduled;
        }
        let worker = Arc::clone(self);
        let project = project.clone();
        // FIXME(concertim): a pending refresh lives in memory only: if the process stops within
        // the interval, the team shows the previous figures until the project's next usage
        // schedules another refresh. The figures are re-read whole, so none is lost for good.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(worker.settings.team_refresh_interval_ms)).await;
            // Requests from now on need a refresh that starts after them: a new one.
            worker.pending.lock().unwrap_or_else(PoisonError::into_inner).remove(&project);
            worker.refresh_with_retries(&project).await;
        });
        Done::Scheduled
    }

    async fn refresh_with_retries(&self, project: &ProjectId) {
        // As patient as a queued update: the retry queue's budget, in process.
        let s = &self.settings;
        let mut schedule = retry::in_process(&BackoffSettings {
            initial_ms: s.backoff.initial_ms,
            max_ms: s.retry_delay_ms.max(s.backoff.max_ms),
            max_elapsed_ms: s.retry_delay_ms.saturating_mul(u64::from(s.max_attempts)),
        });
        loop {
            let result = self.refresh_team(project).await;
            let label = match &result {
                Ok(done) => done.as_str(),
                Err(_) => "failed",
            };
            match result {
                Ok(_) => {
                    metrics::counter!(crate::telemetry::CONCERTIM_UPDATES, "update" => "refresh_team", "result" => label)
                        .increment(1);
                    return;
                }
                Err(e) if e.class() == ErrorClass::Transient => match schedule.next_wait() {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => {
                        warn!(project_id = %project, error.message = %e, "team refresh gave up; the next usage of the project schedules another");
                        return;
                    }
                },
                Err(e) => {
                    metrics::counter!(crate::telemetry::CONCERTIM_UPDATES, "update" => "refresh_team", "result" => "failed")
                        .increment(1);
                    warn!(project_id = %project, error.message = %e, "team refresh refused");
                    return;
                }
            }
        }
    }

    /// Writes the team's cost, credits and billing period as the billing application has them now.
    async fn refresh_team(&self, project: &ProjectId) -> Result<Done, UpdateError> {
        let Some(team) = self.find(Kind::Team, project.as_str()).await? else { return Ok(Done::NotFound) };
        // A team created after its project was (its link found no team then) is linked now.
        if team.value.as_deref().is_none_or(str::is_empty) {
            self.link(project, &team).await?;
        }
        let today = time::OffsetDateTime::now_utc().date();
        let Some(figures) = self.billing.team_figures(project, today).await? else { return Ok(Done::NotFound) };
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let fields = json!({
            "cost": format!("{:.2}", figures.cost),
            "credits": format!("{:.2}", figures.credits),
            "billing_period_start": figures.period_start.to_string(),
            "billing_period_end": figures.period_end.to_string(),
        });
        let done = self.change(Kind::Team, project.as_str(), &team, fields, None, None).await?;
        self.write_costs(&team.id, &figures.resources).await?;
        Ok(done)
    }

    /// Writes the cost of each of the team's devices (the figures' amount, zero for a device
    /// they do not name) and of each of its racks (the sum of its devices' costs as written).
    /// The team's racks are those it owns and those its costed devices are in.
    // FIXME(concertim): each device's cost is rounded to cents on its own, so where a backend's
    // amounts have more decimals (HostBill's charges) the devices' and racks' sums can differ
    // from the team's cost by a few cents.
    async fn write_costs(&self, team: &str, resources: &[ResourceCost]) -> Result<(), ConcertimError> {
        self.listed_once(Kind::Rack).await?;
        self.listed_once(Kind::Device).await?;
        let mut costed: HashMap<&str, Decimal> = HashMap::new();
        for r in resources {
            // A miss lists the devices again: the device may be newer than the last listing.
            if self.find(Kind::Device, &r.resource_id).await?.is_some() {
                costed.insert(r.resource_id.as_str(), cents(r.amount));
            } else {
                count("device_cost", Done::NotFound);
            }
        }
        let devices = self.all_cached(Kind::Device);
        let mut racks: HashSet<String> = self
            .all_cached(Kind::Rack)
            .into_iter()
            .filter(|(_, rack)| rack.parent.as_deref() == Some(team))
            .map(|(_, rack)| rack.id)
            .collect();
        racks.extend(
            devices.iter().filter(|(key, _)| costed.contains_key(key.as_str())).filter_map(|(_, d)| d.parent.clone()),
        );
        for (key, device) in &devices {
            let in_team_rack = device.parent.as_ref().is_some_and(|rack| racks.contains(rack));
            let cost = match costed.get(key.as_str()) {
                Some(cost) => *cost,
                None if in_team_rack => Decimal::ZERO,
                None => continue,
            };
            let done = self.set_cost(Kind::Device, key, device, cost).await?;
            count("device_cost", done);
        }
        let devices = self.all_cached(Kind::Device);
        let places: Vec<(Option<&str>, Option<Decimal>)> =
            devices.iter().map(|(_, d)| (d.parent.as_deref(), d.cost)).collect();
        let sums = rack_sums(&places);
        for rack_id in racks {
            let Some((key, rack)) = self.find_by(Kind::Rack, |_, e| e.id == rack_id).await? else {
                count("rack_cost", Done::NotFound);
                continue;
            };
            let cost = sums.get(rack_id.as_str()).copied().unwrap_or_default();
            let done = self.set_cost(Kind::Rack, &key, &rack, cost).await?;
            count("rack_cost", done);
        }
        Ok(())
    }

    /// PATCHes a device's or rack's cost unless Concertim shows it already.
    async fn set_cost(&self, kind: Kind, key: &str, entry: &Entry, cost: Decimal) -> Result<Done, ConcertimError> {
        if entry.cost == Some(cost) {
            return Ok(Done::Unchanged);
        }
        if !self.client.update(kind.name(), &entry.id, json!({"cost": format!("{cost:.2}")})).await? {
            self.forget(kind, key);
            return Ok(Done::NotFound);
        }
        self.store(kind, key, Entry { cost: Some(cost), ..entry.clone() });
        Ok(Done::Changed)
    }
}

fn count(update: &'static str, done: Done) {
    metrics::counter!(crate::telemetry::CONCERTIM_UPDATES, "update" => update, "result" => done.as_str()).increment(1);
}

/// An amount as Concertim shows it: in cents, half away from zero.
fn cents(amount: Decimal) -> Decimal {
    amount.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero)
}

/// The cost of each rack: the sum of the costs of the devices in it, from (device's rack,
/// device's cost) pairs. A device with no cost adds nothing; a device in no rack is in no sum.
fn rack_sums<'a>(devices: &[(Option<&'a str>, Option<Decimal>)]) -> HashMap<&'a str, Decimal> {
    let mut sums: HashMap<&str, Decimal> = HashMap::new();
    for (rack, cost) in devices {
        if let Some(rack) = rack {
            *sums.entry(rack).or_default() += cost.unwrap_or_default();
        }
    }
    sums
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Team => "team",
            Kind::Device => "device",
            Kind::Rack => "rack",
        }
    }
}

fn team_entry(team: Team) -> Option<(String, Entry)> {
    let project = team.project_id.filter(|p| !p.is_empty())?;
    Some((project, Entry { id: team.id, value: team.billing_acct_id, ..Entry::default() }))
}

fn item_entries(items: Vec<Item>, key: &str) -> Vec<(String, Entry)> {
    items
        .into_iter()
        .filter_map(|item| {
            let k = item.metadata(key)?;
            let parent = match (item.location, item.owner) {
                (Some(location), _) => location.rack_id,
                (None, Some(owner)) => owner.id,
                (None, None) => None,
            };
            Some((k, Entry { id: item.id, value: item.status, at: None, cost: item.cost, parent }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap()
    }

    #[test]
    fn a_racks_cost_is_the_sum_of_the_costs_of_the_devices_in_it() {
        let devices = [
            (Some("r1"), Some(d("1.25"))),
            (Some("r1"), Some(d("0.75"))),
            // Not costed yet: adds nothing.
            (Some("r1"), None),
            (Some("r2"), Some(d("3"))),
            // In no rack: in no sum.
            (None, Some(d("100"))),
        ];
        let sums = rack_sums(&devices);
        assert_eq!(sums.get("r1"), Some(&d("2.00")));
        assert_eq!(sums.get("r2"), Some(&d("3")));
        assert_eq!(sums.len(), 2);
    }

    #[test]
    fn amounts_are_shown_in_cents_rounded_half_away_from_zero() {
        assert_eq!(cents(d("0.125")).to_string(), "0.13");
        assert_eq!(cents(d("0.135")).to_string(), "0.14");
        assert_eq!(cents(d("2")), d("2.00"));
    }
}
